//! The runbook file as serde reads it, before validation. Unknown keys are refused by serde with their line.

use serde::Deserialize;
use serde_norway::Value;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRunbook {
    pub(crate) runbook: String,
    pub(crate) description: Option<String>,
    #[serde(default)]
    pub(crate) roles: Vec<String>,
    #[serde(default)]
    pub(crate) params: BTreeMap<String, Value>,
    pub(crate) point_of_no_return: Option<String>,
    #[serde(default)]
    pub(crate) steps: Vec<RawStep>,
}

/// A step, and also an undo body (which may use none of the step-only keys: validation says so).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    pub(crate) id: Option<String>,
    pub(crate) scope: Option<String>,
    pub(crate) on: Option<String>,
    pub(crate) roles: Option<Vec<String>>,
    pub(crate) once: Option<bool>,
    pub(crate) idempotent: Option<bool>,
    pub(crate) resolve: Option<RawCheck>,
    /// `none` or a step body; read as a value so a bad undo is reported at its own line.
    pub(crate) undo: Option<Value>,
    pub(crate) check: Option<RawCheck>,
    pub(crate) http: Option<RawHttp>,
    pub(crate) backup: Option<RawBackup>,
    pub(crate) yaml_edit: Option<RawYamlEdit>,
    pub(crate) sql: Option<RawSql>,
    pub(crate) container: Option<RawContainer>,
    pub(crate) mark: Option<String>,
    pub(crate) assert: Option<String>,
    pub(crate) restore: Option<RawRestore>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCheck {
    pub(crate) command: Option<Vec<String>>,
    pub(crate) http: Option<RawProbeHttp>,
    pub(crate) sql: Option<RawQuery>,
    pub(crate) expect: Option<RawExpect>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProbeHttp {
    pub(crate) method: Option<String>,
    pub(crate) url: String,
    pub(crate) body: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuery {
    pub(crate) database: String,
    pub(crate) query: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExpect {
    pub(crate) exit: Option<i32>,
    pub(crate) field: Option<String>,
    pub(crate) equals: Option<Value>,
    pub(crate) not_equals: Option<Value>,
    pub(crate) no_rows: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttp {
    pub(crate) method: Option<String>,
    pub(crate) url: String,
    pub(crate) body: Option<String>,
    pub(crate) save: Option<String>,
    pub(crate) restore: Option<String>,
    pub(crate) expect_status: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackup {
    pub(crate) paths: Option<Vec<String>>,
    pub(crate) command: Option<Vec<String>>,
    pub(crate) output: Option<String>,
    pub(crate) min_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawYamlEdit {
    pub(crate) file: String,
    #[serde(default)]
    pub(crate) edits: Vec<RawEdit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEdit {
    pub(crate) copy: Option<RawKeyMove>,
    pub(crate) rename: Option<RawKeyMove>,
    pub(crate) delete: Option<String>,
    pub(crate) when: Option<RawWhen>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKeyMove {
    pub(crate) from: String,
    pub(crate) to: String,
    #[serde(default)]
    pub(crate) overwrite: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWhen {
    pub(crate) present: Option<String>,
    pub(crate) absent: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSql {
    pub(crate) database: String,
    #[serde(default)]
    pub(crate) statements: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawContainer {
    pub(crate) name: String,
    pub(crate) swap: Option<RawSwap>,
    #[serde(default)]
    pub(crate) stop: bool,
    #[serde(default)]
    pub(crate) start: bool,
    pub(crate) exec: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSwap {
    #[serde(default)]
    pub(crate) env_add: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRestore {
    pub(crate) backup: String,
    pub(crate) command: Option<Vec<String>>,
}
