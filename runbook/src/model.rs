//! The validated runbook: what [`crate::parse`] returns once every check passed. Strings that may hold
//! placeholders are kept as written (see [`crate::placeholder`]); they are rendered when a step is scheduled.

use serde::Serialize;
use std::collections::BTreeMap;

/// A whole runbook file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Runbook {
    /// `runbook:` its name.
    pub name: String,
    /// `description:`.
    pub description: Option<String>,
    /// `roles:` the roles whose nodes run the `node` steps, in the order given (the planner orders the nodes).
    pub roles: Vec<String>,
    /// `params:` values for `{name}` placeholders, as strings.
    pub params: BTreeMap<String, String>,
    /// `point_of_no_return:` the id of the step after whose success a failure no longer rolls back by itself.
    pub point_of_no_return: Option<String>,
    /// Steps in file order: cluster steps before the nodes, node steps, cluster steps after the nodes.
    pub steps: Vec<Step>,
    /// Databases named by `sql` steps and `sql` checks (the topology must define them).
    pub databases: Vec<String>,
}

impl Runbook {
    /// The steps of one scope, in file order.
    pub fn steps_in(&self, scope: Scope) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |step| step.scope == scope)
    }
}

/// Where a step sits in the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// `scope: cluster` before the first node step: runs once, before any node.
    ClusterBefore,
    /// `scope: node`: runs on every node of the step's roles, node after node in plan order.
    Node,
    /// `scope: cluster` after the last node step: runs once, after every node.
    ClusterAfter,
}

/// Where a cluster step runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunsOn {
    /// On the controller (HTTP calls, SQL, marks, asserts).
    Controller,
    /// On the first node, in plan order, of this role (commands, files, containers).
    FirstNodeOf(String),
}

/// One step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// `id:` unique in the runbook; journal entries and `--dry-run` name it.
    pub id: String,
    /// 1-based line of the step in the file.
    pub line: usize,
    /// Cluster before/after or node.
    pub scope: Scope,
    /// Cluster steps: where they run. Node steps: [`RunsOn::Controller`] is never used.
    pub on: RunsOn,
    /// Node steps: the roles whose nodes run it (default: the runbook's `roles`).
    pub roles: Vec<String>,
    /// `once: true`: a node step run on exactly one node of each of its roles, the role's first node in plan order.
    pub once: bool,
    /// What the step does.
    pub action: Action,
    /// How a failure after this step is undone.
    pub undo: Undo,
    /// Whether running it twice equals running it once (the kind's default, or `idempotent:` as declared).
    pub idempotent: bool,
    /// `resolve:` a read-only check telling, after a crash mid-step, whether a non-idempotent step took effect.
    pub resolve: Option<Check>,
}

impl Step {
    /// Whether the step changes anything outside the upgrade journal.
    pub fn changes_something(&self) -> bool {
        self.action.changes_something()
    }
}

/// What a step undoes on rollback.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Undo {
    /// Read-only steps (`check`, `assert`, `mark`, `backup`, an HTTP GET): nothing to undo.
    NothingToUndo,
    /// Built into the kind: `yaml_edit` restores the original bytes, `container` swaps or starts the old container
    /// back.
    BuiltIn,
    /// `undo: <step body>` or `undo: [<step body>, ..]`, run in order.
    Actions(Vec<Action>),
    /// `undo: none`, only at or after the point of no return.
    None,
}

/// The kinds of step.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `check:` a command, HTTP call or SQL query and its expectation.
    Check(Check),
    /// `http:` a call whose answer can be saved, or whose body is a saved value.
    Http(HttpCall),
    /// `backup:` files or directories copied, or a command's output saved.
    Backup(Backup),
    /// `yaml_edit:` key edits of a YAML file (see [`crate::yaml_edit`]).
    YamlEdit(YamlEditStep),
    /// `sql:` statements against a database of the topology.
    Sql(SqlStatements),
    /// `container:` swap, stop, start or exec.
    Container(ContainerAction),
    /// `mark: NAME`: the time now, kept under NAME.
    Mark(String),
    /// `assert: EXPR` over marks, saved values and params.
    Assert(crate::assert::Assertion),
    /// `restore:` put back what a `backup` step saved, after checking its sha256.
    Restore(Restore),
}

impl Action {
    /// The kind's YAML key, for messages and `--dry-run`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Check(_) => "check",
            Action::Http(_) => "http",
            Action::Backup(_) => "backup",
            Action::YamlEdit(_) => "yaml_edit",
            Action::Sql(_) => "sql",
            Action::Container(_) => "container",
            Action::Mark(_) => "mark",
            Action::Assert(_) => "assert",
            Action::Restore(_) => "restore",
        }
    }

    /// Whether the action changes anything outside the upgrade journal (a backup only adds a file).
    pub fn changes_something(&self) -> bool {
        match self {
            Action::Check(_) | Action::Backup(_) | Action::Mark(_) | Action::Assert(_) => false,
            Action::Http(call) => call.method != HttpMethod::Get,
            Action::YamlEdit(_) | Action::Sql(_) | Action::Container(_) | Action::Restore(_) => {
                true
            }
        }
    }
}

/// `check:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// What is run or asked.
    pub probe: Probe,
    /// What the answer must be.
    pub expect: Expect,
}

/// What a check runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// An action the agent declares (argv template).
    Command(Vec<String>),
    /// An HTTP call from the controller.
    Http {
        /// Method.
        method: HttpMethod,
        /// URL template.
        url: String,
        /// Body template.
        body: Option<String>,
    },
    /// A query against a database of the topology.
    Sql {
        /// Database name (in the topology).
        database: String,
        /// The query.
        query: String,
    },
}

/// What a check expects.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    /// The command exits with this code.
    Exit(i32),
    /// A JSON field (dotted path) of the answer equals this (as text).
    FieldEquals {
        /// Dotted path.
        field: String,
        /// Expected value.
        value: String,
    },
    /// A JSON field of the answer differs from this.
    FieldNotEquals {
        /// Dotted path.
        field: String,
        /// Refused value.
        value: String,
    },
    /// The query returns no row.
    NoRows,
}

/// HTTP methods steps may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// Read-only.
    Get,
    /// Idempotent write.
    Put,
    /// Non-idempotent write.
    Post,
    /// Idempotent delete.
    Delete,
    /// Non-idempotent partial write.
    Patch,
}

impl HttpMethod {
    /// HTTP's own idempotency (RFC 9110 §9.2.2).
    pub fn is_idempotent(self) -> bool {
        matches!(self, HttpMethod::Get | HttpMethod::Put | HttpMethod::Delete)
    }

    /// The method as HTTP spells it.
    pub fn name(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Put => "PUT",
            HttpMethod::Post => "POST",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Patch => "PATCH",
        }
    }
}

/// `http:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpCall {
    /// Method (default GET).
    pub method: HttpMethod,
    /// URL template.
    pub url: String,
    /// Body template; with `restore`, the saved value is the body.
    pub body: Option<String>,
    /// `save: NAME = field`: keep a JSON field of the answer under NAME.
    pub save: Option<Save>,
    /// `restore: NAME`: send the value saved under NAME as the body.
    pub restore: Option<String>,
    /// Expected status (default: any 2xx).
    pub expect_status: Option<u16>,
}

/// `save: NAME = field`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Save {
    /// Name the value is kept under (`{saved.NAME}`, `restore: NAME`).
    pub name: String,
    /// Dotted JSON path into the answer (`.` for the whole body).
    pub field: String,
}

/// `backup:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backup {
    /// What is saved.
    pub source: BackupSource,
    /// Smallest accepted size of each saved file, in bytes (default 1: an empty dump fails the step).
    pub min_bytes: u64,
}

/// What a backup saves.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupSource {
    /// Files or directories, copied.
    Paths(Vec<String>),
    /// A declared command's standard output, saved to `output`.
    CommandOutput {
        /// Argv template of the declared action.
        command: Vec<String>,
        /// Where the output is kept.
        output: String,
    },
}

/// `restore:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Restore {
    /// The id of the `backup` step whose files are put back (each checked against its recorded sha256 first).
    pub backup: String,
    /// For a command-output backup: the declared command fed the saved output on its standard input.
    pub command: Option<Vec<String>>,
}

/// `yaml_edit:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct YamlEditStep {
    /// The file (template), under a root the agent declares.
    pub file: String,
    /// Edits, applied in order.
    pub edits: Vec<crate::yaml_edit::Edit>,
}

/// `sql:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SqlStatements {
    /// Database name (in the topology).
    pub database: String,
    /// Statements, run in order in one session.
    pub statements: Vec<String>,
}

/// `container:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContainerAction {
    /// Container name (template).
    pub name: String,
    /// What is done to it.
    pub op: ContainerOp,
}

/// What a `container` step does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerOp {
    /// Replace the container by one of the package's image with the same mounts and settings plus `env_add`.
    Swap {
        /// Extra environment (`IS_UPGRADE=true`).
        env_add: BTreeMap<String, String>,
    },
    /// Stop it (built-in undo: start it).
    Stop,
    /// Start it (built-in undo: stop it).
    Start,
    /// Run a command inside it.
    Exec(Vec<String>),
}
