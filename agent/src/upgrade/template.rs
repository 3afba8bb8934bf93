//! Action argv templates: typed positional parameters checked, then put into the declared argv at their
//! `{name}` marks. The result is executed as it is (no shell), so a value can only ever be one argument's text.

use super::UpgradeError;
use super::config::ActionSpec;
use super::paths::Roots;
use serde::Deserialize;

/// The type of an action parameter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawParamType")]
pub enum ParamType {
    /// 1..=128 of `[A-Za-z0-9_.:@-]`, not starting with `-`.
    Word,
    /// A decimal integer.
    Int,
    /// An absolute, clean path under a declared root.
    Path,
    /// One of the listed values.
    OneOf(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawParamType {
    Named(String),
    OneOf { one_of: Vec<String> },
}

impl TryFrom<RawParamType> for ParamType {
    type Error = String;

    fn try_from(raw: RawParamType) -> Result<Self, String> {
        match raw {
            RawParamType::Named(name) => match name.as_str() {
                "word" => Ok(ParamType::Word),
                "int" => Ok(ParamType::Int),
                "path" => Ok(ParamType::Path),
                other => Err(format!(
                    "unknown parameter type `{other}`: use \"word\", \"int\", \"path\" or {{ one_of = [..] }}"
                )),
            },
            RawParamType::OneOf { one_of } => Ok(ParamType::OneOf(one_of)),
        }
    }
}

impl ParamType {
    /// Whether `value` has this type (paths only lexically; see [`render`] for the roots).
    pub fn check(&self, value: &str) -> Result<(), String> {
        match self {
            ParamType::Word => {
                let fine = (1..=128).contains(&value.len())
                    && !value.starts_with('-')
                    && value.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@' | '-')
                    });
                if fine {
                    Ok(())
                } else {
                    Err(format!(
                        "`{value}` is not a word (1 to 128 of letters, digits, `_.:@-`, not starting with `-`)"
                    ))
                }
            }
            ParamType::Int => {
                let digits = value.strip_prefix('-').unwrap_or(value);
                if !digits.is_empty()
                    && digits.len() <= 19
                    && digits.chars().all(|c| c.is_ascii_digit())
                {
                    Ok(())
                } else {
                    Err(format!("`{value}` is not a decimal integer"))
                }
            }
            ParamType::Path => {
                if patchd_apply::confine::is_clean_absolute(std::path::Path::new(value)) {
                    Ok(())
                } else {
                    Err(format!(
                        "`{value}` is not a clean absolute path (no `.`, `..` or relative parts)"
                    ))
                }
            }
            ParamType::OneOf(choices) => {
                if choices.iter().any(|choice| choice == value) {
                    Ok(())
                } else {
                    Err(format!("`{value}` is not one of {choices:?}"))
                }
            }
        }
    }
}

/// The `{name}` marks in one argv element, in order.
pub fn placeholders(arg: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        out.push(after[..close].to_string());
        rest = &after[close + 1..];
    }
    out
}

/// The argv of `action` called with `args`: the count and every type checked (`INVALID_ARGUMENT`), a `path`
/// also under a root without a symlink on its way (`PERMISSION_DENIED`).
pub fn render(
    action: &ActionSpec,
    args: &[String],
    roots: &Roots,
) -> Result<Vec<String>, UpgradeError> {
    if args.len() != action.params.len() {
        let expected: Vec<&str> = action.params.iter().map(|p| p.name.as_str()).collect();
        return Err(UpgradeError::Invalid(format!(
            "action `{}` takes {} argument(s) ({}) but was given {}: fix the runbook's `command`",
            action.name,
            expected.len(),
            expected.join(", "),
            args.len()
        )));
    }
    for (param, value) in action.params.iter().zip(args) {
        param.kind.check(value).map_err(|problem| {
            UpgradeError::Invalid(format!(
                "action `{}` parameter `{}`: {problem}; fix the runbook's `command`",
                action.name, param.name
            ))
        })?;
        if param.kind == ParamType::Path {
            roots.check_path(
                value,
                &format!("parameter `{}` of action `{}`", param.name, action.name),
            )?;
        }
    }
    Ok(action
        .argv
        .iter()
        .map(|arg| fill(arg, action, args))
        .collect())
}

/// `arg` with each `{name}` replaced by its value, in one pass: a value is never scanned for marks again.
fn fill(arg: &str, action: &ActionSpec, args: &[String]) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let name = &after[..close];
        out.push_str(&rest[..open]);
        match action.params.iter().position(|p| p.name == name) {
            Some(index) => out.push_str(&args[index]),
            None => out.push_str(&rest[open..open + close + 2]),
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}
