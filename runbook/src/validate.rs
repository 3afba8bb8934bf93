//! From the file as read to a [`Runbook`]: defaults, then every check, each problem naming its line and key.

use crate::assert::{Assertion, Operand};
use crate::lines::LineIndex;
use crate::model::*;
use crate::placeholder::{Placeholder, placeholders};
use crate::raw::*;
use crate::yaml_edit::{Edit, EditOp, When};
use crate::{ClusterFacts, Problem};
use serde_norway::Value;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Keys a step may have that an undo body may not.
const STEP_ONLY_KEYS: &str = "id, scope, on, roles, once, idempotent, resolve, undo";

struct Checker<'a> {
    index: &'a LineIndex,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            line: self.index.line(key),
            key: key.to_string(),
            message: message.into(),
        });
    }
}

/// What templates of a step may name.
struct Known<'a> {
    params: &'a BTreeMap<String, String>,
    saved: &'a HashSet<String>,
    marks: &'a HashSet<String>,
    has_node: bool,
    /// Where the step runs (a `restore` must run where its backup was taken).
    place: Place,
}

/// Where a step instance runs, for matching a `restore` with its backup.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    Controller,
    /// On every node of its roles.
    EachNode,
    /// On the first node, in plan order, of these roles.
    FirstOf(Vec<String>),
}

/// What a `restore` needs to know of an earlier `backup`.
struct BackupInfo {
    command_output: bool,
    place: Place,
}

pub(crate) fn build(
    raw: RawRunbook,
    index: &LineIndex,
    facts: Option<&ClusterFacts>,
) -> Result<Runbook, Vec<Problem>> {
    let mut checker = Checker {
        index,
        problems: Vec::new(),
    };
    let c = &mut checker;
    if raw.runbook.trim().is_empty() {
        c.problem("runbook", "the runbook has no name; give `runbook: <name>`");
    }
    let mut roles: Vec<String> = Vec::new();
    for (position, role) in raw.roles.iter().enumerate() {
        if roles.contains(role) {
            c.problem(
                &format!("roles[{position}]"),
                format!("role `{role}` is listed twice; list it once"),
            );
        } else {
            roles.push(role.clone());
        }
    }
    if let Some(facts) = facts {
        for (position, role) in roles.iter().enumerate() {
            if !facts.roles.contains(role) {
                c.problem(
                    &format!("roles[{position}]"),
                    format!(
                        "role `{role}` is not in the cluster's topology; its roles are: {}",
                        facts.roles.join(", ")
                    ),
                );
            }
        }
    }
    let mut params = BTreeMap::new();
    for (name, value) in raw.params {
        let text = match value {
            Value::String(text) => text,
            Value::Number(number) => number.to_string(),
            Value::Bool(flag) => flag.to_string(),
            _ => {
                c.problem(
                    &format!("params.{name}"),
                    "a param is a string, number or boolean; write it as one",
                );
                continue;
            }
        };
        if Placeholder::parse(&name) != Placeholder::Param(&name) || name.contains('.') {
            c.problem(
                &format!("params.{name}"),
                format!("`{name}` is a built-in placeholder name; rename the param"),
            );
        }
        params.insert(name, text);
    }

    // Ids and scopes first: later checks refer to steps by id and position.
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut scopes = Vec::new();
    let mut node_seen = false;
    let mut after_seen = false;
    for (position, step) in raw.steps.iter().enumerate() {
        let path = format!("steps[{position}]");
        match &step.id {
            None => c.problem(&path, "the step has no `id:`; give it a unique id"),
            Some(id) => {
                if id.is_empty()
                    || !id
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_'))
                {
                    c.problem(
                        &format!("{path}.id"),
                        format!("step id `{id}` may only hold letters, digits, `-` and `_`"),
                    );
                }
                if let Some(first) = ids.get(id) {
                    c.problem(
                        &format!("{path}.id"),
                        format!(
                            "step id `{id}` is already used by steps[{first}]; every id must be unique"
                        ),
                    );
                } else {
                    ids.insert(id.clone(), position);
                }
            }
        }
        let scope = match step.scope.as_deref() {
            Some("node") => {
                if after_seen {
                    c.problem(
                        &format!("{path}.scope"),
                        "a node step after a cluster step that follows the nodes: node steps must be \
                         one block; move this step up, before the cluster steps that run after the nodes",
                    );
                }
                node_seen = true;
                Scope::Node
            }
            Some("cluster") => {
                if node_seen {
                    after_seen = true;
                    Scope::ClusterAfter
                } else {
                    Scope::ClusterBefore
                }
            }
            Some(other) => {
                c.problem(
                    &format!("{path}.scope"),
                    format!("scope `{other}` is unknown; write `cluster` or `node`"),
                );
                Scope::ClusterBefore
            }
            None => {
                c.problem(
                    &path,
                    "the step has no `scope:`; write `scope: cluster` (once, before or after the nodes) or \
                     `scope: node` (on every node)",
                );
                Scope::ClusterBefore
            }
        };
        scopes.push(scope);
    }
    if node_seen && roles.is_empty() {
        c.problem(
            "roles",
            "node steps need the roles whose nodes they run on: add `roles: [<role>, ...]`",
        );
    }
    let ponr = raw.point_of_no_return.as_ref().and_then(|id| {
        let found = ids.get(id).copied();
        if found.is_none() {
            c.problem(
                "point_of_no_return",
                format!("`{id}` is not the id of a step; name the step after which the upgrade cannot be undone"),
            );
        }
        found
    });

    let mut steps = Vec::new();
    let mut saved = HashSet::new();
    let mut marks = HashSet::new();
    let mut backups: HashMap<String, BackupInfo> = HashMap::new();
    let mut databases: Vec<(String, String)> = Vec::new();
    for (position, raw_step) in raw.steps.into_iter().enumerate() {
        let path = format!("steps[{position}]");
        let scope = scopes[position];
        let id = raw_step.id.clone().unwrap_or_default();
        let on = match (&raw_step.on, scope) {
            (None, _) => RunsOn::Controller,
            (Some(_), Scope::Node) => {
                c.problem(
                    &format!("{path}.on"),
                    "`on:` is for cluster steps; a node step runs on each node of its roles",
                );
                RunsOn::Controller
            }
            (Some(target), _) if target == "controller" => RunsOn::Controller,
            (Some(role), _) => {
                if !roles.contains(role) {
                    c.problem(
                        &format!("{path}.on"),
                        format!(
                            "`on: {role}`: write `controller` or one of the runbook's roles ({})",
                            roles.join(", ")
                        ),
                    );
                }
                RunsOn::FirstNodeOf(role.clone())
            }
        };
        let step_roles = match (&raw_step.roles, scope) {
            (Some(_), Scope::ClusterBefore | Scope::ClusterAfter) => {
                c.problem(
                    &format!("{path}.roles"),
                    "`roles:` is for node steps; a cluster step runs once (`on:` picks a node)",
                );
                Vec::new()
            }
            (Some(list), Scope::Node) => {
                for (at, role) in list.iter().enumerate() {
                    if !roles.contains(role) {
                        c.problem(
                            &format!("{path}.roles[{at}]"),
                            format!(
                                "role `{role}` is not one of the runbook's roles ({}); add it to `roles:`",
                                roles.join(", ")
                            ),
                        );
                    }
                }
                list.clone()
            }
            (None, Scope::Node) => roles.clone(),
            (None, _) => Vec::new(),
        };
        let once = raw_step.once.unwrap_or(false);
        if once && scope != Scope::Node {
            c.problem(
                &format!("{path}.once"),
                "`once:` is for node steps; a cluster step runs once already",
            );
        }
        let has_node = scope == Scope::Node || matches!(on, RunsOn::FirstNodeOf(_));
        let place = match (&on, scope) {
            (_, Scope::Node) if once => Place::FirstOf(step_roles.clone()),
            (_, Scope::Node) => Place::EachNode,
            (RunsOn::FirstNodeOf(role), _) => Place::FirstOf(vec![role.clone()]),
            (RunsOn::Controller, _) => Place::Controller,
        };
        let known = Known {
            params: &params,
            saved: &saved,
            marks: &marks,
            has_node,
            place: place.clone(),
        };
        let Some(action) = action_from(c, &raw_step, &path, &known, &backups, &mut databases)
        else {
            continue;
        };
        if let Action::Backup(backup) = &action {
            backups.insert(
                id.clone(),
                BackupInfo {
                    command_output: matches!(backup.source, BackupSource::CommandOutput { .. }),
                    place,
                },
            );
        }
        if !has_node && needs_node(&action) {
            c.problem(
                &path,
                format!(
                    "a `{}` step acts on a host: make it a node step, or give the cluster step `on: <role>`",
                    action.kind()
                ),
            );
        }
        let after_ponr = ponr.is_some_and(|ponr| position >= ponr);
        let undo = undo_from(
            c,
            &raw_step,
            &path,
            &action,
            after_ponr,
            &known,
            &backups,
            &mut databases,
        );
        let default_idempotent = !once && kind_is_idempotent(&action);
        let idempotent = match raw_step.idempotent {
            Some(true) if once => {
                c.problem(
                    &format!("{path}.idempotent"),
                    "a `once` step is never re-run after a crash; remove `idempotent: true`",
                );
                false
            }
            Some(declared) => declared,
            None => default_idempotent,
        };
        let resolve = match &raw_step.resolve {
            None => None,
            Some(_) if idempotent => {
                c.problem(
                    &format!("{path}.resolve"),
                    "`resolve:` is for non-idempotent steps (an idempotent one is simply re-run); remove it",
                );
                None
            }
            Some(raw_check) => check_from(
                c,
                raw_check,
                &format!("{path}.resolve"),
                &known,
                &mut databases,
            ),
        };
        if let Action::Http(call) = &action
            && let Some(save) = &call.save
        {
            if scope == Scope::Node {
                c.problem(
                    &format!("{path}.http.save"),
                    "`save:` is for cluster steps (one value for the upgrade); move the call to a cluster step",
                );
            }
            if !saved.insert(save.name.clone()) {
                c.problem(
                    &format!("{path}.http.save"),
                    format!(
                        "a value named `{}` is saved already; choose another name",
                        save.name
                    ),
                );
            }
        }
        if let Action::Mark(name) = &action
            && !marks.insert(name.clone())
        {
            c.problem(
                &format!("{path}.mark"),
                format!("mark `{name}` is recorded by an earlier step; choose another name"),
            );
        }
        if ponr == Some(position) && !action.changes_something() {
            c.problem(
                "point_of_no_return",
                format!("step `{id}` changes nothing; the point of no return is a step that changes something"),
            );
        }
        steps.push(Step {
            id,
            line: index.line(&path).unwrap_or(0),
            scope,
            on,
            roles: step_roles,
            once,
            action,
            undo,
            idempotent,
            resolve,
        });
    }
    // A node step past the point of no return in file order may still run before it, on nodes of a role the
    // point of no return does not run on (roles go one after the other in plan order).
    if let Some(ponr_step) = raw
        .point_of_no_return
        .as_ref()
        .and_then(|id| steps.iter().find(|step| &step.id == id))
        .filter(|step| step.scope == Scope::Node)
    {
        for step in steps
            .iter()
            .filter(|step| step.scope == Scope::Node && step.undo == Undo::None)
        {
            let outside: Vec<&String> = step
                .roles
                .iter()
                .filter(|role| !ponr_step.roles.contains(role))
                .collect();
            if !outside.is_empty() {
                let position = ids.get(&step.id).copied().unwrap_or_default();
                c.problem(
                    &format!("steps[{position}].undo"),
                    format!(
                        "`undo: none` on role(s) {} where the point of no return `{}` never runs, so this step could \
                         run before it; give it an undo, or run the point of no return on those roles too",
                        outside.iter().map(|role| role.as_str()).collect::<Vec<_>>().join(", "),
                        ponr_step.id
                    ),
                );
            }
        }
    }
    if let Some(facts) = facts {
        for (database, key) in &databases {
            if !facts.databases.contains(database) {
                c.problem(
                    key,
                    format!(
                        "database `{database}` is not defined in the cluster's topology (`databases:`); define \
                         it there with its host, port, user and password source"
                    ),
                );
            }
        }
    }
    if !checker.problems.is_empty() {
        let mut problems = checker.problems;
        problems.sort_by_key(|problem| problem.line.unwrap_or(usize::MAX));
        return Err(problems);
    }
    Ok(Runbook {
        name: raw.runbook,
        description: raw.description,
        roles,
        params,
        point_of_no_return: raw.point_of_no_return,
        steps,
        databases: databases.into_iter().map(|(name, _)| name).collect(),
    })
}

/// Whether a restore running at `restore` finds the files a backup taken at `backup` saved.
fn restores_where_taken(backup: &Place, restore: &Place) -> bool {
    match (backup, restore) {
        // Each node restores its own copy; the first node of a role has one too.
        (Place::EachNode, Place::EachNode | Place::FirstOf(_)) => true,
        (Place::FirstOf(taken), Place::FirstOf(restoring)) => taken == restoring,
        _ => false,
    }
}

fn describe_place(place: &Place) -> String {
    match place {
        Place::Controller => "on the controller".to_string(),
        Place::EachNode => "on every node".to_string(),
        Place::FirstOf(roles) => format!("on the first node of {}", roles.join(", ")),
    }
}

fn needs_node(action: &Action) -> bool {
    match action {
        Action::Check(check) => matches!(check.probe, Probe::Command(_)),
        Action::Backup(_) | Action::YamlEdit(_) | Action::Container(_) | Action::Restore(_) => true,
        Action::Http(_) | Action::Sql(_) | Action::Mark(_) | Action::Assert(_) => false,
    }
}

/// Whether running the kind twice equals running it once, unless the step declares otherwise.
fn kind_is_idempotent(action: &Action) -> bool {
    match action {
        Action::Check(_) | Action::Mark(_) | Action::Assert(_) => true,
        Action::Http(call) => call.method.is_idempotent(),
        // A second dump would replace the recorded one; a second SQL run or exec repeats its effect.
        Action::Backup(_) | Action::Sql(_) => false,
        Action::Container(container) => !matches!(container.op, ContainerOp::Exec(_)),
        Action::YamlEdit(_) | Action::Restore(_) => true,
    }
}

#[allow(clippy::too_many_arguments)]
fn undo_from(
    c: &mut Checker<'_>,
    raw: &RawStep,
    path: &str,
    action: &Action,
    after_ponr: bool,
    known: &Known<'_>,
    backups: &HashMap<String, BackupInfo>,
    databases: &mut Vec<(String, String)>,
) -> Undo {
    let key = format!("{path}.undo");
    let built_in = matches!(action, Action::YamlEdit(_))
        || matches!(action, Action::Container(container) if !matches!(container.op, ContainerOp::Exec(_)));
    match &raw.undo {
        None if !action.changes_something() => Undo::NothingToUndo,
        None if built_in => Undo::BuiltIn,
        None => {
            c.problem(
                path,
                format!(
                    "a `{}` step changes something: give `undo:` (what puts it back), or `undo: none` if it is at \
                     or after the `point_of_no_return`",
                    action.kind()
                ),
            );
            Undo::None
        }
        Some(_) if !action.changes_something() => {
            c.problem(
                &key,
                format!(
                    "a `{}` step changes nothing, so it has nothing to undo; remove `undo:`",
                    action.kind()
                ),
            );
            Undo::NothingToUndo
        }
        Some(_) if built_in => {
            c.problem(
                &key,
                format!(
                    "a `{}` step undoes itself (yaml_edit restores the original bytes, container steps put the old \
                     container back); remove `undo:`",
                    action.kind()
                ),
            );
            Undo::BuiltIn
        }
        Some(Value::String(text)) if text == "none" => {
            if !after_ponr {
                c.problem(
                    &key,
                    "`undo: none` is allowed only at or after the `point_of_no_return` step (before it, a failure \
                     rolls everything back, so every change needs its undo); give an undo, or declare \
                     `point_of_no_return:`",
                );
            }
            Undo::None
        }
        Some(Value::Sequence(items)) if items.is_empty() => {
            c.problem(
                &key,
                "`undo: []` undoes nothing; give the undo steps, or `undo: none`",
            );
            Undo::None
        }
        Some(Value::Sequence(items)) => {
            let mut actions = Vec::new();
            for (at, item) in items.iter().enumerate() {
                actions.extend(undo_body(
                    c,
                    item,
                    &format!("{key}[{at}]"),
                    known,
                    backups,
                    databases,
                ));
            }
            Undo::Actions(actions)
        }
        Some(value) => match undo_body(c, value, &key, known, backups, databases) {
            Some(action) => Undo::Actions(vec![action]),
            None => Undo::None,
        },
    }
}

/// One undo body (`undo: {..}` or an item of `undo: [..]`).
fn undo_body(
    c: &mut Checker<'_>,
    value: &Value,
    key: &str,
    known: &Known<'_>,
    backups: &HashMap<String, BackupInfo>,
    databases: &mut Vec<(String, String)>,
) -> Option<Action> {
    let body: RawStep = match serde_norway::from_value(value.clone()) {
        Ok(body) => body,
        Err(error) => {
            c.problem(
                key,
                format!("`undo:` is `none`, a step body or a list of them: {error}"),
            );
            return None;
        }
    };
    if body.id.is_some()
        || body.scope.is_some()
        || body.on.is_some()
        || body.roles.is_some()
        || body.once.is_some()
        || body.idempotent.is_some()
        || body.resolve.is_some()
        || body.undo.is_some()
    {
        c.problem(
            key,
            format!("an undo is a step body only; it takes none of: {STEP_ONLY_KEYS}"),
        );
    }
    let undo = action_from(c, &body, key, known, backups, databases)?;
    if !known.has_node && needs_node(&undo) {
        c.problem(
            key,
            format!(
                "a `{}` undo acts on a host, and this step runs on the controller: give the cluster step `on: <role>`",
                undo.kind()
            ),
        );
        return None;
    }
    if !undo.changes_something() {
        c.problem(
            key,
            format!(
                "an undo must put something back; a `{}` changes nothing",
                undo.kind()
            ),
        );
        return None;
    }
    Some(undo)
}

/// The one kind key of a step (or undo body) turned into an [`Action`]; `None` after reporting problems.
fn action_from(
    c: &mut Checker<'_>,
    raw: &RawStep,
    path: &str,
    known: &Known<'_>,
    backups: &HashMap<String, BackupInfo>,
    databases: &mut Vec<(String, String)>,
) -> Option<Action> {
    let given: Vec<&str> = [
        ("check", raw.check.is_some()),
        ("http", raw.http.is_some()),
        ("backup", raw.backup.is_some()),
        ("yaml_edit", raw.yaml_edit.is_some()),
        ("sql", raw.sql.is_some()),
        ("container", raw.container.is_some()),
        ("mark", raw.mark.is_some()),
        ("assert", raw.assert.is_some()),
        ("restore", raw.restore.is_some()),
    ]
    .into_iter()
    .filter_map(|(kind, present)| present.then_some(kind))
    .collect();
    if given.len() != 1 {
        c.problem(
            path,
            if given.is_empty() {
                "the step does nothing: give one of check, http, backup, yaml_edit, sql, container, mark, \
                 assert, restore"
                    .to_string()
            } else {
                format!(
                    "the step has several kinds ({}); give one per step",
                    given.join(", ")
                )
            },
        );
        return None;
    }
    let before = c.problems.len();
    let action = if let Some(check) = &raw.check {
        Action::Check(check_from(
            c,
            check,
            &format!("{path}.check"),
            known,
            databases,
        )?)
    } else if let Some(http) = &raw.http {
        let key = format!("{path}.http");
        let method = method_from(c, http.method.as_deref(), &format!("{key}.method"));
        templates(c, &format!("{key}.url"), [http.url.as_str()], known);
        templates(c, &format!("{key}.body"), http.body.as_deref(), known);
        check_url(c, &format!("{key}.url"), &http.url);
        let save = http
            .save
            .as_deref()
            .and_then(|text| match text.split_once('=') {
                Some((name, field)) if is_name(name.trim()) && !field.trim().is_empty() => {
                    Some(Save {
                        name: name.trim().to_string(),
                        field: field.trim().to_string(),
                    })
                }
                _ => {
                    c.problem(
                        &format!("{key}.save"),
                        format!(
                            "`save: {text}`: write `NAME = <json field>` (`.` for the whole answer)"
                        ),
                    );
                    None
                }
            });
        if let Some(name) = &http.restore {
            if !known.saved.contains(name) {
                c.problem(
                    &format!("{key}.restore"),
                    format!("`restore: {name}`: no earlier cluster step saves `{name}` (`save: {name} = <field>`)"),
                );
            }
            if http.body.is_some() {
                c.problem(
                    &format!("{key}.restore"),
                    "`restore:` sends the saved value as the body; remove `body:`",
                );
            }
        }
        if let Some(status) = http.expect_status
            && !(100..=599).contains(&status)
        {
            c.problem(
                &format!("{key}.expect_status"),
                format!("{status} is not an HTTP status; give one between 100 and 599"),
            );
        }
        Action::Http(HttpCall {
            method,
            url: http.url.clone(),
            body: http.body.clone(),
            save,
            restore: http.restore.clone(),
            expect_status: http.expect_status,
        })
    } else if let Some(backup) = &raw.backup {
        let key = format!("{path}.backup");
        let source = match (&backup.paths, &backup.command, &backup.output) {
            (Some(paths), None, None) if !paths.is_empty() => {
                templates(
                    c,
                    &format!("{key}.paths"),
                    paths.iter().map(String::as_str),
                    known,
                );
                BackupSource::Paths(paths.clone())
            }
            (None, Some(command), Some(output)) if !command.is_empty() => {
                templates(
                    c,
                    &format!("{key}.command"),
                    command.iter().map(String::as_str),
                    known,
                );
                templates(c, &format!("{key}.output"), [output.as_str()], known);
                BackupSource::CommandOutput {
                    command: command.clone(),
                    output: output.clone(),
                }
            }
            _ => {
                c.problem(
                    &key,
                    "a backup saves either `paths: [..]` (files or directories) or a `command: [..]` with the \
                     `output:` file its standard output goes to",
                );
                return None;
            }
        };
        Action::Backup(Backup {
            source,
            min_bytes: backup.min_bytes.unwrap_or(1),
        })
    } else if let Some(edit) = &raw.yaml_edit {
        let key = format!("{path}.yaml_edit");
        templates(c, &format!("{key}.file"), [edit.file.as_str()], known);
        if edit.edits.is_empty() {
            c.problem(
                &format!("{key}.edits"),
                "no edits; give at least one copy, rename or delete",
            );
        }
        let edits = edit
            .edits
            .iter()
            .enumerate()
            .filter_map(|(at, raw_edit)| edit_from(c, raw_edit, &format!("{key}.edits[{at}]")))
            .collect();
        Action::YamlEdit(YamlEditStep {
            file: edit.file.clone(),
            edits,
        })
    } else if let Some(sql) = &raw.sql {
        let key = format!("{path}.sql");
        note_database(databases, &sql.database, &format!("{key}.database"));
        if sql.statements.is_empty() {
            c.problem(
                &format!("{key}.statements"),
                "no statements; give the SQL to run",
            );
        }
        templates(
            c,
            &format!("{key}.statements"),
            sql.statements.iter().map(String::as_str),
            known,
        );
        Action::Sql(SqlStatements {
            database: sql.database.clone(),
            statements: sql.statements.clone(),
        })
    } else if let Some(container) = &raw.container {
        let key = format!("{path}.container");
        templates(c, &format!("{key}.name"), [container.name.as_str()], known);
        let mut ops = Vec::new();
        if let Some(swap) = &container.swap {
            ops.push(ContainerOp::Swap {
                env_add: swap.env_add.clone(),
            });
        }
        if container.stop {
            ops.push(ContainerOp::Stop);
        }
        if container.start {
            ops.push(ContainerOp::Start);
        }
        if let Some(exec) = &container.exec {
            if exec.is_empty() {
                c.problem(
                    &format!("{key}.exec"),
                    "`exec:` is empty; give the command's argv",
                );
            }
            templates(
                c,
                &format!("{key}.exec"),
                exec.iter().map(String::as_str),
                known,
            );
            ops.push(ContainerOp::Exec(exec.clone()));
        }
        if ops.len() != 1 {
            c.problem(
                &key,
                "a container step does one of: `swap: {env_add: ..}`, `stop: true`, `start: true`, `exec: [..]`",
            );
            return None;
        }
        Action::Container(ContainerAction {
            name: container.name.clone(),
            op: ops.remove(0),
        })
    } else if let Some(mark) = &raw.mark {
        if !is_name(mark) {
            c.problem(
                &format!("{path}.mark"),
                format!("mark name `{mark}` may only hold letters, digits and `_`, not starting with a digit"),
            );
        }
        Action::Mark(mark.clone())
    } else if let Some(text) = &raw.assert {
        let key = format!("{path}.assert");
        match Assertion::parse(text) {
            Err(error) => {
                c.problem(&key, error.to_string());
                return None;
            }
            Ok(assertion) => {
                for operand in assertion.operands() {
                    match operand {
                        Operand::Name(name)
                            if !known.marks.contains(name) && !known.saved.contains(name) =>
                        {
                            c.problem(
                                &key,
                                format!("`{name}` is not a mark or saved value recorded by an earlier step"),
                            );
                        }
                        Operand::Param { name, .. } if !known.params.contains_key(name) => {
                            c.problem(
                                &key,
                                format!("`{{{name}}}` is not a param; add it to `params:`"),
                            );
                        }
                        _ => {}
                    }
                }
                Action::Assert(assertion)
            }
        }
    } else if let Some(restore) = &raw.restore {
        let key = format!("{path}.restore");
        match backups.get(&restore.backup) {
            None => c.problem(
                &format!("{key}.backup"),
                format!("`{}` is not an earlier backup step; name the backup to restore", restore.backup),
            ),
            Some(info) if !restores_where_taken(&info.place, &known.place) => c.problem(
                &format!("{key}.backup"),
                format!(
                    "`{}` was taken {}, but this step runs {}: a restore runs where its backup is",
                    restore.backup,
                    describe_place(&info.place),
                    describe_place(&known.place)
                ),
            ),
            Some(info) if info.command_output && restore.command.is_none() => c.problem(
                &key,
                format!(
                    "`{}` saved a command's output: give the declared `command:` that reads it back",
                    restore.backup
                ),
            ),
            Some(info) if !info.command_output && restore.command.is_some() => c.problem(
                &format!("{key}.command"),
                format!("`{}` copied files; they are put back as they were, without a command", restore.backup),
            ),
            Some(_) => {}
        }
        if let Some(command) = &restore.command {
            templates(
                c,
                &format!("{key}.command"),
                command.iter().map(String::as_str),
                known,
            );
        }
        Action::Restore(Restore {
            backup: restore.backup.clone(),
            command: restore.command.clone(),
        })
    } else {
        return None;
    };
    (c.problems.len() == before).then_some(action)
}

fn check_from(
    c: &mut Checker<'_>,
    raw: &RawCheck,
    key: &str,
    known: &Known<'_>,
    databases: &mut Vec<(String, String)>,
) -> Option<Check> {
    let before = c.problems.len();
    let probe = match (&raw.command, &raw.http, &raw.sql) {
        (Some(command), None, None) if !command.is_empty() => {
            templates(
                c,
                &format!("{key}.command"),
                command.iter().map(String::as_str),
                known,
            );
            Probe::Command(command.clone())
        }
        (None, Some(http), None) => {
            let method = method_from(c, http.method.as_deref(), &format!("{key}.http.method"));
            templates(c, &format!("{key}.http.url"), [http.url.as_str()], known);
            templates(c, &format!("{key}.http.body"), http.body.as_deref(), known);
            check_url(c, &format!("{key}.http.url"), &http.url);
            if method != HttpMethod::Get {
                c.problem(&format!("{key}.http.method"), "a check only reads: use GET");
            }
            Probe::Http {
                method,
                url: http.url.clone(),
                body: http.body.clone(),
            }
        }
        (None, None, Some(query)) => {
            note_database(databases, &query.database, &format!("{key}.sql.database"));
            templates(
                c,
                &format!("{key}.sql.query"),
                [query.query.as_str()],
                known,
            );
            Probe::Sql {
                database: query.database.clone(),
                query: query.query.clone(),
            }
        }
        _ => {
            c.problem(key, "a check runs one of: `command: [..]`, `http: {url: ..}`, `sql: {database: .., query: ..}`");
            return None;
        }
    };
    let Some(expect) = &raw.expect else {
        c.problem(
            key,
            "a check needs `expect:` (`exit: 0`, `field: .. equals: ..`, or `no_rows: true`)",
        );
        return None;
    };
    let expect_key = format!("{key}.expect");
    let scalar = |value: &Value| match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    };
    let expect = match (
        expect.exit,
        &expect.field,
        &expect.equals,
        &expect.not_equals,
        expect.no_rows,
    ) {
        (Some(code), None, None, None, None) => {
            if !matches!(probe, Probe::Command(_)) {
                c.problem(&expect_key, "`exit:` is for a `command` check");
            }
            Expect::Exit(code)
        }
        (None, Some(field), Some(value), None, None)
        | (None, Some(field), None, Some(value), None) => {
            if matches!(probe, Probe::Sql { .. }) {
                c.problem(&expect_key, "an SQL check expects `no_rows: true`");
            }
            let Some(value_text) = scalar(value) else {
                c.problem(
                    &expect_key,
                    "compare a field with a string, number or boolean",
                );
                return None;
            };
            if expect.equals.is_some() {
                Expect::FieldEquals {
                    field: field.clone(),
                    value: value_text,
                }
            } else {
                Expect::FieldNotEquals {
                    field: field.clone(),
                    value: value_text,
                }
            }
        }
        (None, None, None, None, Some(true)) => {
            if !matches!(probe, Probe::Sql { .. }) {
                c.problem(&expect_key, "`no_rows:` is for an `sql` check");
            }
            Expect::NoRows
        }
        _ => {
            c.problem(
                &expect_key,
                "expect one of: `exit: <code>`, `field: <path>` with `equals:` or `not_equals:`, `no_rows: true`",
            );
            return None;
        }
    };
    (c.problems.len() == before).then_some(Check { probe, expect })
}

fn edit_from(c: &mut Checker<'_>, raw: &RawEdit, key: &str) -> Option<Edit> {
    let mut ops = Vec::new();
    let mut patterns = Vec::new();
    if let Some(copy) = &raw.copy {
        patterns.push((
            format!("{key}.copy"),
            copy.from.clone(),
            Some(copy.to.clone()),
        ));
        ops.push(EditOp::Copy {
            from: copy.from.clone(),
            to: copy.to.clone(),
            overwrite: copy.overwrite,
        });
    }
    if let Some(rename) = &raw.rename {
        patterns.push((
            format!("{key}.rename"),
            rename.from.clone(),
            Some(rename.to.clone()),
        ));
        ops.push(EditOp::Rename {
            from: rename.from.clone(),
            to: rename.to.clone(),
            overwrite: rename.overwrite,
        });
    }
    if let Some(delete) = &raw.delete {
        patterns.push((format!("{key}.delete"), delete.clone(), None));
        ops.push(EditOp::Delete(delete.clone()));
    }
    if ops.len() != 1 {
        c.problem(
            key,
            "an edit is one of `copy: {from, to}`, `rename: {from, to}`, `delete: <key>`",
        );
        return None;
    }
    for (pattern_key, from, to) in patterns {
        let stars = from.matches('*').count();
        if from.is_empty() || stars > 1 {
            c.problem(
                &pattern_key,
                format!("key pattern `{from}` must be a key with at most one `*`"),
            );
        }
        if let Some(to) = to
            && to.matches('*').count() != stars
        {
            c.problem(
                &pattern_key,
                format!("`to: {to}` must hold a `*` exactly when `from: {from}` does (it stands for what matched)"),
            );
        }
    }
    let when = match &raw.when {
        None => None,
        Some(RawWhen {
            present: Some(key_pattern),
            absent: None,
        }) => Some(When::Present(key_pattern.clone())),
        Some(RawWhen {
            present: None,
            absent: Some(key_pattern),
        }) => Some(When::Absent(key_pattern.clone())),
        Some(_) => {
            c.problem(
                &format!("{key}.when"),
                "`when:` is one of `present: <key>` or `absent: <key>`",
            );
            None
        }
    };
    Some(Edit {
        op: ops.remove(0),
        when,
    })
}

fn method_from(c: &mut Checker<'_>, method: Option<&str>, key: &str) -> HttpMethod {
    match method.map(str::to_ascii_uppercase).as_deref() {
        None | Some("GET") => HttpMethod::Get,
        Some("PUT") => HttpMethod::Put,
        Some("POST") => HttpMethod::Post,
        Some("DELETE") => HttpMethod::Delete,
        Some("PATCH") => HttpMethod::Patch,
        Some(other) => {
            c.problem(
                key,
                format!("method `{other}` is not one of GET, PUT, POST, DELETE, PATCH"),
            );
            HttpMethod::Get
        }
    }
}

fn check_url(c: &mut Checker<'_>, key: &str, url: &str) {
    if !(url.starts_with("http://") || url.starts_with("https://") || url.starts_with('{')) {
        c.problem(
            key,
            format!(
                "`{url}` must start with http:// or https:// (or a param holding the base URL)"
            ),
        );
    }
}

/// Notes a database name with the key that first named it.
fn note_database(databases: &mut Vec<(String, String)>, name: &str, key: &str) {
    if !databases.iter().any(|(known, _)| known == name) {
        databases.push((name.to_string(), key.to_string()));
    }
}

fn templates<'t>(
    c: &mut Checker<'_>,
    key: &str,
    texts: impl IntoIterator<Item = &'t str>,
    known: &Known<'_>,
) {
    for text in texts {
        let names = match placeholders(text) {
            Ok(names) => names,
            Err(error) => {
                c.problem(key, error.to_string());
                continue;
            }
        };
        for name in names {
            let problem = match Placeholder::parse(name) {
                Placeholder::Node(_) if !known.has_node => Some(format!(
                    "`{{{name}}}` is a node's placeholder; this step runs on the controller (use it in a node \
                     step, or give the cluster step `on: <role>`)"
                )),
                Placeholder::Saved(saved) if !known.saved.contains(saved) => Some(format!(
                    "`{{{name}}}`: no earlier cluster step saves `{saved}` (`http` with `save: {saved} = <field>`)"
                )),
                Placeholder::Mark(mark) if !known.marks.contains(mark) => Some(format!(
                    "`{{{name}}}`: no earlier step records `mark: {mark}`"
                )),
                Placeholder::Param(param) if !known.params.contains_key(param) => Some(format!(
                    "`{{{name}}}` is not a placeholder: the node's are {{host}} {{id}} {{name}} {{role}} \
                     {{is_first}} {{is_last}}, then {{saved.NAME}}, {{mark.NAME}} and the runbook's params ({})",
                    known.params.keys().cloned().collect::<Vec<_>>().join(", ")
                )),
                _ => None,
            };
            if let Some(message) = problem {
                c.problem(key, message);
            }
        }
    }
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !text.starts_with(|c: char| c.is_ascii_digit())
}
