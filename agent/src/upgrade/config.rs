//! The `[upgrade]` section of `patchd.toml`: the roots upgrade steps may read and write below, and the named
//! actions (`[[upgrade.action]]`: an argv template with typed positional parameters) a runbook may call. Nothing
//! else runs: the controller names an action and its arguments, never a command. Checked by `patchd validate`.
//! Also the parameter types ([`ParamType`]) and the `{name}` marks of an argv ([`placeholders`]).

use patchd_apply::spec::{BackendKind, ServiceSpec};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A declared action is killed after this long unless it says otherwise.
pub const DEFAULT_ACTION_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// `[upgrade]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeSection {
    /// Upgrade steps read and write only below these (plus the agent's backup area `<state_dir>/upgrade/`).
    #[serde(default)]
    pub roots: Vec<PathBuf>,
    /// `[[upgrade.action]]`.
    #[serde(default, rename = "action")]
    pub actions: Vec<ActionSpec>,
}

/// One `[[upgrade.action]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// What a runbook names (`command: [NAME, ARG..]`).
    pub name: String,
    /// The program and its arguments; `{param}` marks where a parameter's value goes.
    pub argv: Vec<String>,
    /// Positional parameters, in the order a runbook passes them.
    #[serde(default)]
    pub params: Vec<ParamSpec>,
    /// The action reads a file on its standard input (a RestoreOp with `call`).
    #[serde(default)]
    pub stdin: bool,
    /// Runs inside the container the request names (`docker exec`) instead of on the host.
    #[serde(default)]
    pub container: bool,
    /// Killed after this long.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The action's whole environment besides `PATH` (the agent's own is not passed on).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_timeout() -> Duration {
    DEFAULT_ACTION_TIMEOUT
}

/// A humantime duration ("10m", "90s").
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let raw = String::deserialize(d)?;
    humantime::parse_duration(&raw).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{raw}` is not a duration ({e}): write it like \"10m\" or \"90s\""
        ))
    })
}

/// The type of an action parameter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawParamType")]
pub enum ParamType {
    /// 1..=128 of `[A-Za-z0-9_.:@-]`, not starting with `-`.
    Word,
    /// A decimal integer without a sign.
    Int,
    /// An absolute, clean path under a declared root, of plain characters (letters, digits, `/_.:@+,=-`).
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
            // No sign: a value starting with `-` would be read as an option by most programs.
            ParamType::Int => {
                if !value.is_empty()
                    && value.len() <= 19
                    && value.chars().all(|c| c.is_ascii_digit())
                {
                    Ok(())
                } else {
                    Err(format!(
                        "`{value}` is not a decimal integer of at most 19 digits without a sign (a leading `-` \
                         would read as an option)"
                    ))
                }
            }
            // Plain characters only: an action's argv may hand the value to a shell (`sh -c "... {path}"`),
            // where a space, quote, `;`, `$` or newline would be syntax.
            ParamType::Path => {
                if !patchd_apply::confine::is_clean_absolute(std::path::Path::new(value)) {
                    Err(format!(
                        "`{value}` is not a clean absolute path (no `.`, `..` or relative parts)"
                    ))
                } else if value.len() > 4096 || !value.chars().all(is_plain_path_char) {
                    Err(format!(
                        "{value:?} holds characters a path parameter may not (only letters, digits and \
                         `/_.:@+,=-`, at most 4096): rename the file or pass its directory"
                    ))
                } else {
                    Ok(())
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

/// A character of a `path` parameter: nothing a shell reads as syntax, no whitespace or control character.
fn is_plain_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '.' | ':' | '@' | '+' | ',' | '=' | '-')
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

/// One parameter of an action.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ParamType,
}

impl UpgradeSection {
    /// The declared action called `name`.
    pub fn action(&self, name: &str) -> Option<&ActionSpec> {
        self.actions.iter().find(|action| action.name == name)
    }

    /// Every problem of the section as (key, message); `state_dir` must not overlap a root (backups live there).
    pub fn validate(&self, state_dir: &Path, services: &[ServiceSpec]) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push((key, message));
        for (i, root) in self.roots.iter().enumerate() {
            let key = format!("upgrade.roots[{i}]");
            if !patchd_apply::confine::is_clean_absolute(root) || root == Path::new("/") {
                problem(
                    key,
                    format!(
                        "`{}` must be a clean absolute path below `/` (no `.` or `..`): name the directory \
                         upgrade steps may touch",
                        root.display()
                    ),
                );
            } else if !root.is_dir() {
                problem(
                    key,
                    format!(
                        "{} does not exist or is not a directory: create it first",
                        root.display()
                    ),
                );
            } else if state_dir.starts_with(root) || root.starts_with(state_dir) {
                problem(
                    key,
                    format!(
                        "{} overlaps state_dir {}: keep them apart (backups go to <state_dir>/upgrade/)",
                        root.display(),
                        state_dir.display()
                    ),
                );
            }
        }
        let has_docker = services.iter().any(|s| s.backend == BackendKind::Docker);
        let mut names = BTreeSet::new();
        for (i, action) in self.actions.iter().enumerate() {
            let key = format!("upgrade.action[{i}] ({})", action.name);
            for message in check_action(action, has_docker) {
                problem(key.clone(), message);
            }
            if !names.insert(action.name.as_str()) {
                problem(
                    format!("upgrade.action[{i}].name"),
                    format!(
                        "`{}` is declared twice: action names must be unique",
                        action.name
                    ),
                );
            }
        }
        problems
    }
}

fn check_action(action: &ActionSpec, has_docker: bool) -> Vec<String> {
    let mut out = Vec::new();
    if ParamType::Word.check(&action.name).is_err() {
        out.push(format!(
            "name `{}`: use 1 to 128 letters, digits or `_.:@-`, not starting with `-`",
            action.name
        ));
    }
    let Some(program) = action.argv.first() else {
        out.push("argv is empty: name the program to run and its arguments".into());
        return out;
    };
    if program.is_empty() || !placeholders(program).is_empty() {
        out.push(format!(
            "argv[0] `{program}` must be a fixed program (an absolute path, or a name found on PATH), not a \
             parameter"
        ));
    }
    let mut declared = BTreeSet::new();
    for param in &action.params {
        if ParamType::Word.check(&param.name).is_err() {
            out.push(format!(
                "param name `{}`: use letters, digits or `_`",
                param.name
            ));
        }
        if !declared.insert(param.name.as_str()) {
            out.push(format!("param `{}` is declared twice", param.name));
        }
        if let ParamType::OneOf(choices) = &param.kind
            && choices.is_empty()
        {
            out.push(format!(
                "param `{}`: `one_of` lists no value; list the values it may take",
                param.name
            ));
        }
    }
    let mut used = BTreeSet::new();
    for (i, arg) in action.argv.iter().enumerate() {
        for name in placeholders(arg) {
            if !declared.contains(name.as_str()) {
                out.push(format!(
                    "argv[{i}] uses `{{{name}}}`, which is not among its params: declare it in `params` or \
                     remove it"
                ));
            }
            used.insert(name);
        }
    }
    for param in &action.params {
        if !used.contains(&param.name) {
            out.push(format!(
                "param `{}` appears nowhere in argv: use it as `{{{}}}` or remove it",
                param.name, param.name
            ));
        }
    }
    if action.container && action.stdin {
        out.push(
            "`stdin = true` is for host actions only (a dump is loaded on the host): drop one of them".into(),
        );
    }
    if action.container && !has_docker {
        out.push(
            "`container = true` but no [[service]] has backend = \"docker\": the action could run in no \
             container; declare the docker service or set container = false"
                .into(),
        );
    }
    if action.timeout.is_zero() {
        out.push("timeout must be more than 0 (e.g. \"10m\")".into());
    }
    for key in action.env.keys() {
        let fine = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !fine || key == "PATH" {
            out.push(format!(
                "env key `{key}`: use letters, digits and `_` (PATH is always the agent's own)"
            ));
        }
    }
    out
}
