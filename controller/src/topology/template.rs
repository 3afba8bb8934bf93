//! The URL template renderer of the cluster-API hooks: `{host}`, `{port}`, `{name}`… filled from a node.

use super::model::{HookSpec, Node};

/// A URL or body template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Not one of the known placeholders.
    #[error(
        "unknown placeholder `{{{0}}}`; use {{host}} {{port}} {{id}} {{name}} {{role}} or \
         {{<role>.leader.host|port|name|id}}"
    )]
    UnknownPlaceholder(String),
    /// The leader of a role is needed but not known (no leader, or its leader hook failed).
    #[error(
        "the template needs the leader of role {0}, which is not known: check that role's leader hook"
    )]
    NoLeader(String),
}

/// Renders a URL (or body) template for `node`. `leaders(role)` returns the current leader of a role, for
/// `{<role>.leader.host|port|name|id}`. Values are inserted verbatim (IDs and names are checked at import to hold
/// no character that would need escaping in a URL path). Text in braces that is not placeholder-shaped (such as
/// JSON in a body) is left as is.
pub fn render_url<'n>(
    template: &str,
    node: &Node,
    leaders: &dyn Fn(&str) -> Option<&'n Node>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some((before, placeholder, after)) = next_placeholder(rest) {
        out.push_str(before);
        let value = match Placeholder::parse(placeholder)? {
            Placeholder::Node(field) => field.of(node),
            Placeholder::Leader { role, field } => {
                let leader =
                    leaders(role).ok_or_else(|| TemplateError::NoLeader(role.to_string()))?;
                field.of(leader)
            }
        };
        out.push_str(&value);
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NodeField {
    Host,
    Port,
    Id,
    Name,
    Role,
}

impl NodeField {
    pub(super) fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "host" => NodeField::Host,
            "port" => NodeField::Port,
            "id" => NodeField::Id,
            "name" => NodeField::Name,
            "role" => NodeField::Role,
            _ => return None,
        })
    }

    pub(super) fn of(self, node: &Node) -> String {
        match self {
            NodeField::Host => node.host.clone(),
            NodeField::Port => node.port.to_string(),
            NodeField::Id => node.id.clone(),
            NodeField::Name => node.name.clone(),
            NodeField::Role => node.role.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placeholder<'t> {
    Node(NodeField),
    Leader { role: &'t str, field: NodeField },
}

impl<'t> Placeholder<'t> {
    pub(super) fn parse(text: &'t str) -> Result<Self, TemplateError> {
        let unknown = || TemplateError::UnknownPlaceholder(text.to_string());
        if let Some(field) = NodeField::parse(text) {
            return Ok(Placeholder::Node(field));
        }
        let (role, field) = text.rsplit_once('.').ok_or_else(unknown)?;
        let role = role
            .strip_suffix(".leader")
            .filter(|role| !role.is_empty())
            .ok_or_else(unknown)?;
        let field = NodeField::parse(field)
            .filter(|field| *field != NodeField::Role)
            .ok_or_else(unknown)?;
        Ok(Placeholder::Leader { role, field })
    }
}

/// Placeholder-shaped text: `{` + letters, digits, `_ - .` + `}`.
pub(super) fn next_placeholder(text: &str) -> Option<(&str, &str, &str)> {
    let mut search_from = 0;
    while let Some(offset) = text[search_from..].find('{') {
        let open = search_from + offset;
        let inner_start = open + 1;
        let inner_len = text[inner_start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
            .unwrap_or(text.len() - inner_start);
        let close = inner_start + inner_len;
        if inner_len > 0 && text[close..].starts_with('}') {
            return Some((&text[..open], &text[inner_start..close], &text[close + 1..]));
        }
        search_from = inner_start;
    }
    None
}

pub(super) fn placeholders(template: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = template;
    while let Some((_, placeholder, after)) = next_placeholder(rest) {
        found.push(placeholder);
        rest = after;
    }
    found
}

// ----- raw file shape (serde checks types and unknown keys, with locations) -----

// Beside the renderer that defines the placeholders, so the model does not depend on it.
impl HookSpec {
    /// Roles whose current leader the templates of this hook need (`{<role>.leader.…}`), without duplicates.
    pub fn leader_roles(&self) -> Vec<String> {
        let mut roles = Vec::new();
        for template in std::iter::once(self.url.as_str()).chain(self.body.as_deref()) {
            for placeholder in placeholders(template) {
                if let Ok(Placeholder::Leader { role, .. }) = Placeholder::parse(placeholder)
                    && !roles.iter().any(|known: &String| known == role)
                {
                    roles.push(role.to_string());
                }
            }
        }
        roles
    }
}
