//! Action argv templates: typed positional parameters checked, then put into the declared argv at their
//! `{name}` marks. The result is executed as it is (no shell), so a value can only ever be one argument's text.

use super::config::{ActionSpec, ParamType};
use super::error::UpgradeError;
use super::paths::Roots;

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
