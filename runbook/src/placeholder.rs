//! `{name}` placeholders in step templates: which exist, where each may appear, and rendering.
//!
//! * Node: `{host}` `{id}` `{name}` `{role}` `{deploy_dir}` `{service}` (the node's, from the topology), `{is_first}` / `{is_last}` (`true` when the node is the
//!   first / last of its role in plan order). In node steps and in cluster steps that run `on:` a role's node.
//! * `{param}`: a value of the runbook's `params:`; a param's value may itself hold node placeholders
//!   (`config: "{deploy_dir}/config.yaml"`), rendered for the step's node.
//! * `{saved.NAME}`: a value a `cluster` step before this one saved (`http` … `save: NAME = field`).
//! * `{mark.NAME}`: the time (Unix seconds) a `mark: NAME` step recorded before this one.
//!
//! `{{` and `}}` stand for literal braces (JSON bodies).

/// The node placeholders.
pub const NODE_PLACEHOLDERS: [&str; 8] = [
    "host",
    "id",
    "name",
    "role",
    "deploy_dir",
    "service",
    "is_first",
    "is_last",
];

/// A placeholder as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder<'t> {
    /// One of [`NODE_PLACEHOLDERS`].
    Node(&'t str),
    /// `saved.NAME`.
    Saved(&'t str),
    /// `mark.NAME`.
    Mark(&'t str),
    /// A param (or an unknown name: the caller checks `params`).
    Param(&'t str),
}

impl<'t> Placeholder<'t> {
    /// Classifies the text between the braces.
    pub fn parse(inner: &'t str) -> Self {
        if let Some(name) = inner.strip_prefix("saved.") {
            Placeholder::Saved(name)
        } else if let Some(name) = inner.strip_prefix("mark.") {
            Placeholder::Mark(name)
        } else if NODE_PLACEHOLDERS.contains(&inner) {
            Placeholder::Node(inner)
        } else {
            Placeholder::Param(inner)
        }
    }
}

/// A template that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an unclosed `{{` in `{0}`; close it, or write `{{{{` for a literal brace")]
pub struct UnclosedBrace(pub String);

/// The placeholders of `template`, in order.
pub fn placeholders(template: &str) -> Result<Vec<&str>, UnclosedBrace> {
    let mut found = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        let after = &rest[open + 1..];
        if rest[open..].starts_with("{{") || rest[open..].starts_with("}}") {
            rest = &after[1..];
            continue;
        }
        if rest.as_bytes()[open] == b'}' {
            rest = after;
            continue;
        }
        let Some(close) = after.find('}') else {
            return Err(UnclosedBrace(template.to_string()));
        };
        found.push(&after[..close]);
        rest = &after[close + 1..];
    }
    Ok(found)
}

/// Replaces every placeholder by `lookup`'s answer; `None` leaves `{name}` as written.
pub fn render(template: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if let Some(after) = tail.strip_prefix('}') {
            out.push('}');
            rest = after;
            continue;
        }
        match tail[1..].find('}') {
            Some(close) => {
                let inner = &tail[1..1 + close];
                match lookup(inner) {
                    Some(value) => out.push_str(&value),
                    None => out.push_str(&tail[..close + 2]),
                }
                rest = &tail[close + 2..];
            }
            None => {
                out.push_str(tail);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_renders_and_escapes() {
        let template = r#"{{"enable": {is_last}, "host": "{host}"}} {saved.ha}"#;
        assert_eq!(
            placeholders(template).unwrap(),
            vec!["is_last", "host", "saved.ha"]
        );
        let rendered = render(template, &|name| match name {
            "is_last" => Some("true".into()),
            "host" => Some("h1".into()),
            _ => None,
        });
        assert_eq!(rendered, r#"{"enable": true, "host": "h1"} {saved.ha}"#);
        assert!(placeholders("a {b").is_err());
        assert_eq!(Placeholder::parse("mark.T1"), Placeholder::Mark("T1"));
        assert_eq!(Placeholder::parse("is_last"), Placeholder::Node("is_last"));
    }
}
