//! Unit tests of the upgrade operations on a temporary root and state dir: templating and types, confinement
//! (outside, `..`, symlinks), dumps and `min_bytes`, restore with a sha256 check, yaml_edit backup and idempotency.

use super::*;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    outside: PathBuf,
    upgrades: Arc<Upgrades>,
}

#[derive(serde::Deserialize)]
struct Only {
    upgrade: UpgradeSection,
}

fn section(text: &str) -> UpgradeSection {
    toml::from_str::<Only>(text).unwrap().upgrade
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let state = dir.path().join("state");
    let outside = dir.path().join("outside");
    for d in [&root, &state, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    let text = format!(
        r#"
[upgrade]
roots = ["{root}"]

[[upgrade.action]]
name = "say"
argv = ["/bin/sh", "-c", "printf '%s' \"$0\"; printf 'to stderr' >&2; exit {{code}}", "{{word}}"]
params = [{{ name = "word", type = "word" }}, {{ name = "code", type = "int" }}]

[[upgrade.action]]
name = "dump"
argv = ["/bin/sh", "-c", "head -c {{bytes}} /dev/zero | tr '\\0' x"]
params = [{{ name = "bytes", type = "int" }}]

[[upgrade.action]]
name = "load"
argv = ["/bin/sh", "-c", "cat > {{target}}"]
params = [{{ name = "target", type = "path" }}]
stdin = true

[[upgrade.action]]
name = "mode"
argv = ["/bin/echo", "{{m}}"]
params = [{{ name = "m", type = {{ one_of = ["fast", "safe"] }} }}]

[[upgrade.action]]
name = "env"
argv = ["/usr/bin/env"]
env = {{ ONLY = "this" }}

[[upgrade.action]]
name = "sleep"
argv = ["/bin/sleep", "30"]
timeout = "200ms"
"#,
        root = root.display()
    );
    let upgrades = Arc::new(Upgrades::with(section(&text), &state, Vec::new()));
    Rig {
        _dir: dir,
        root,
        state,
        outside,
        upgrades,
    }
}

fn call(action: &str, args: &[&str]) -> Option<v1::ActionCall> {
    Some(v1::ActionCall {
        action: action.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
    })
}

fn area() -> BackupArea {
    backup_area("up-1", "edit@n1").unwrap()
}

async fn run(
    rig: &Rig,
    action: &str,
    args: &[&str],
) -> Result<v1::UpgradeStepResponse, UpgradeError> {
    rig.upgrades
        .run_action(v1::RunActionOp {
            call: call(action, args),
            container: String::new(),
        })
        .await
}

#[tokio::test]
async fn a_declared_action_runs_with_its_typed_arguments_and_exit_code() {
    let rig = rig();
    let answer = run(&rig, "say", &["hello", "3"]).await.unwrap();
    assert_eq!(answer.exit_code, 3);
    assert_eq!(&answer.stdout[..], b"hello");
    assert_eq!(answer.stderr_tail, "to stderr");
    assert_eq!(
        &run(&rig, "mode", &["safe"]).await.unwrap().stdout[..],
        b"safe\n"
    );
}

#[tokio::test]
async fn the_environment_is_path_and_the_declared_env_only() {
    let rig = rig();
    let answer = run(&rig, "env", &[]).await.unwrap();
    let text = String::from_utf8(answer.stdout.to_vec()).unwrap();
    let mut names: Vec<&str> = text.lines().filter_map(|l| l.split('=').next()).collect();
    names.sort();
    assert_eq!(names, ["ONLY", "PATH"], "{text}");
}

#[tokio::test]
async fn undeclared_actions_and_bad_arguments_are_refused_before_anything_runs() {
    let rig = rig();
    let denied = run(&rig, "rm", &["-rf", "/"]).await.unwrap_err();
    assert!(
        matches!(&denied, UpgradeError::Denied(m) if m.contains("`rm` is not declared") && m.contains("[[upgrade.action]]")),
        "{denied}"
    );
    for (action, args) in [
        ("say", vec!["hello"]),
        ("say", vec!["-rf", "1"]),
        ("say", vec!["a b", "1"]),
        ("say", vec!["x", "one"]),
        ("mode", vec!["turbo"]),
    ] {
        let refused = run(&rig, action, &args).await.unwrap_err();
        assert!(
            matches!(refused, UpgradeError::Invalid(_)),
            "{action} {args:?}: {refused}"
        );
    }
    let outside = rig.outside.join("x").display().to_string();
    let refused = rig
        .upgrades
        .restore(v1::RestoreOp {
            backups: vec![],
            call: call("load", &[&outside]),
        })
        .await
        .unwrap_err();
    assert!(matches!(refused, UpgradeError::Invalid(_)), "{refused}");
}

#[tokio::test]
async fn a_timeout_kills_the_action() {
    let rig = rig();
    let started = std::time::Instant::now();
    let refused = run(&rig, "sleep", &[]).await.unwrap_err();
    assert!(
        matches!(&refused, UpgradeError::Timeout(m) if m.contains("killed")),
        "{refused}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn templating_is_one_pass_and_paths_must_be_under_a_root() {
    let rig = rig();
    let load = rig.upgrades.section.action("load").unwrap();
    let inside = rig.root.join("f").display().to_string();
    let argv = template::render(load, std::slice::from_ref(&inside), &rig.upgrades.roots).unwrap();
    assert_eq!(argv[2], format!("cat > {inside}"));
    // A value holding a mark is refused outright (and would not be filled again: one pass).
    let marked = rig.root.join("f{target}").display().to_string();
    let refused = template::render(load, &[marked], &rig.upgrades.roots).unwrap_err();
    assert!(matches!(refused, UpgradeError::Invalid(_)), "{refused}");
    for bad in [
        rig.outside.join("f").display().to_string(),
        rig.root.display().to_string(),
    ] {
        let refused =
            template::render(load, std::slice::from_ref(&bad), &rig.upgrades.roots).unwrap_err();
        assert!(
            matches!(refused, UpgradeError::Denied(_)),
            "{bad}: {refused}"
        );
    }
    // `..` is not a path of type `path` at all.
    let dotted = format!("{}/../outside/f", rig.root.display());
    let refused = template::render(load, &[dotted], &rig.upgrades.roots).unwrap_err();
    assert!(matches!(refused, UpgradeError::Invalid(_)), "{refused}");
    std::os::unix::fs::symlink(&rig.outside, rig.root.join("link")).unwrap();
    let through = rig.root.join("link/f").display().to_string();
    let refused = template::render(load, &[through], &rig.upgrades.roots).unwrap_err();
    assert!(matches!(refused, UpgradeError::Denied(_)), "{refused}");
}

#[test]
fn the_section_is_checked_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[upgrade]
roots = ["relative", "{0}/missing"]
[[upgrade.action]]
name = "a"
argv = ["/bin/x", "{{undeclared}}"]
params = [{{ name = "unused", type = "word" }}]
container = true
[[upgrade.action]]
name = "a"
argv = []
"#,
        dir.path().display()
    );
    let problems = section(&text).validate(&dir.path().join("state"), &[]);
    let all: Vec<String> = problems.iter().map(|(k, m)| format!("{k}: {m}")).collect();
    let all = all.join("\n");
    for expected in [
        "upgrade.roots[0]: `relative` must be a clean absolute path",
        "upgrade.roots[1]",
        "does not exist",
        "upgrade.action[0] (a): argv[1] uses `{undeclared}`",
        "param `unused` appears nowhere in argv",
        "no [[service]] has backend = \"docker\"",
        "upgrade.action[1] (a): argv is empty",
        "upgrade.action[1].name: `a` is declared twice",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in\n{all}");
    }
    let bad_type = toml::from_str::<Only>(
        "[upgrade]\n[[upgrade.action]]\nname = \"a\"\nargv = [\"/x\"]\nparams = [{ name = \"p\", type = \"float\" }]\n",
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        bad_type.contains("unknown parameter type `float`"),
        "{bad_type}"
    );
}

async fn dump(
    rig: &Rig,
    bytes: &str,
    output: &str,
    min: u64,
) -> Result<v1::UpgradeStepResponse, UpgradeError> {
    rig.upgrades
        .backup_command(v1::BackupCommandOp {
            call: call("dump", &[bytes]),
            output: output.into(),
            min_bytes: min,
        })
        .await
}

#[tokio::test]
async fn a_dump_below_min_bytes_or_empty_is_refused_and_removed() {
    let rig = rig();
    let output = rig.root.join("dumps/rm.sql");
    let shown = output.display().to_string();
    let empty = dump(&rig, "0", &shown, 0).await.unwrap_err();
    assert!(
        matches!(&empty, UpgradeError::Precondition(m) if m.contains("0 bytes")),
        "{empty}"
    );
    let small = dump(&rig, "10", &shown, 100).await.unwrap_err();
    assert!(matches!(small, UpgradeError::Precondition(_)), "{small}");
    let leftovers: Vec<_> = std::fs::read_dir(rig.root.join("dumps")).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let answer = dump(&rig, "100", &shown, 100).await.unwrap();
    let backup = &answer.backups[0];
    assert_eq!((backup.path.as_str(), backup.size), (shown.as_str(), 100));
    let bytes = std::fs::read(&output).unwrap();
    assert_eq!(bytes, vec![b'x'; 100]);
    let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    assert_eq!(backup.sha256, sha);

    let outside = rig.outside.join("rm.sql").display().to_string();
    assert!(matches!(
        dump(&rig, "10", &outside, 1).await,
        Err(UpgradeError::Denied(_))
    ));
}

#[tokio::test]
async fn a_symlink_planted_under_a_root_is_refused() {
    let rig = rig();
    std::fs::write(rig.outside.join("config.yaml"), "a: 1\n").unwrap();
    std::os::unix::fs::symlink(&rig.outside, rig.root.join("dir-link")).unwrap();
    std::os::unix::fs::symlink(
        rig.outside.join("config.yaml"),
        rig.root.join("file-link.yaml"),
    )
    .unwrap();
    for file in ["dir-link/config.yaml", "file-link.yaml"] {
        let refused = rig
            .upgrades
            .yaml_edit(
                area(),
                v1::YamlEditOp {
                    file: rig.root.join(file).display().to_string(),
                    edits_json: r#"[{"op":{"delete":"a"},"when":null}]"#.into(),
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(refused, UpgradeError::Denied(_)),
            "{file}: {refused}"
        );
    }
    let dotted = format!("{}/../outside/config.yaml", rig.root.display());
    let refused = rig
        .upgrades
        .yaml_edit(
            area(),
            v1::YamlEditOp {
                file: dotted,
                edits_json: "[]".into(),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(refused, UpgradeError::Denied(_)), "{refused}");
    let refused = dump(
        &rig,
        "5",
        &rig.root.join("dir-link/out").display().to_string(),
        1,
    )
    .await
    .unwrap_err();
    assert!(matches!(refused, UpgradeError::Denied(_)), "{refused}");
    let refused = rig
        .upgrades
        .backup_paths(
            area(),
            v1::BackupPathsOp {
                paths: vec![rig.root.display().to_string() + "/dir-link"],
                min_bytes: 0,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(refused, UpgradeError::Denied(_)), "{refused}");
    assert_eq!(
        std::fs::read_to_string(rig.outside.join("config.yaml")).unwrap(),
        "a: 1\n"
    );
}

const CONFIG: &str = "# OMS\noms_meta_host: \"10.0.0.1\"  # keep\nport: 2883\n";
const EDITS: &str = r#"[{"op":{"copy":{"from":"oms_meta_*","to":"oms_cm_meta_*","overwrite":false}},"when":null},
{"op":{"delete":"oms_meta_*"},"when":null}]"#;

#[tokio::test]
async fn yaml_edit_backs_up_the_original_once_is_idempotent_and_restores_byte_for_byte() {
    let rig = rig();
    let file = rig.root.join("oms/config.yaml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, CONFIG).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let op = v1::YamlEditOp {
        file: file.display().to_string(),
        edits_json: EDITS.into(),
    };
    let first = rig.upgrades.yaml_edit(area(), op.clone()).await.unwrap();
    let edited = std::fs::read_to_string(&file).unwrap();
    assert!(
        edited.contains("oms_cm_meta_host") && !edited.contains("oms_meta_host"),
        "{edited}"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let backup = first.backups[0].clone();
    assert!(
        backup
            .path
            .starts_with(&rig.state.join("upgrade/up-1/edit@n1").display().to_string())
    );
    assert_eq!(std::fs::read_to_string(&backup.path).unwrap(), CONFIG);

    let again = rig.upgrades.yaml_edit(area(), op).await.unwrap();
    assert_eq!(again.note, "already edited: nothing changed");
    assert_eq!(
        again.backups[0], backup,
        "the first backup (the original) is kept"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), edited);

    rig.upgrades
        .restore(v1::RestoreOp {
            backups: vec![backup],
            call: None,
        })
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), CONFIG);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o640
    );
}

#[tokio::test]
async fn a_tampered_backup_is_not_restored_and_the_target_is_untouched() {
    let rig = rig();
    let file = rig.root.join("config.yaml");
    std::fs::write(&file, CONFIG).unwrap();
    let saved = rig
        .upgrades
        .backup_paths(
            area(),
            v1::BackupPathsOp {
                paths: vec![file.display().to_string()],
                min_bytes: 1,
            },
        )
        .await
        .unwrap();
    let backup = saved.backups[0].clone();
    assert_eq!(backup.source, file.display().to_string());
    std::fs::write(&file, "changed since\n").unwrap();
    std::fs::write(&backup.path, "tampered\n").unwrap();
    let refused = rig
        .upgrades
        .restore(v1::RestoreOp {
            backups: vec![backup.clone()],
            call: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, UpgradeError::Precondition(m) if m.contains("changed since it was taken")),
        "{refused}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "changed since\n");

    let empty_min = rig
        .upgrades
        .backup_paths(
            area(),
            v1::BackupPathsOp {
                paths: vec![file.display().to_string()],
                min_bytes: 1000,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(empty_min, UpgradeError::Precondition(_)),
        "{empty_min}"
    );
}

#[tokio::test]
async fn a_dump_is_loaded_back_through_a_stdin_action() {
    let rig = rig();
    let shown = rig.root.join("d.sql").display().to_string();
    let saved = dump(&rig, "42", &shown, 1).await.unwrap();
    let target = rig.root.join("loaded").display().to_string();
    rig.upgrades
        .restore(v1::RestoreOp {
            backups: saved.backups,
            call: call("load", &[&target]),
        })
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), vec![b'x'; 42]);
}

#[test]
fn backup_area_names_are_words() {
    assert!(backup_area("up-1", "dump_rm@oms-1").is_ok());
    for (id, step) in [("../x", "s"), ("u", "a/b"), ("", "s"), ("u", ".hidden")] {
        assert!(
            matches!(backup_area(id, step), Err(UpgradeError::Invalid(_))),
            "{id} {step}"
        );
    }
}

#[tokio::test]
async fn standard_output_in_the_answer_is_capped_at_64_kib() {
    let rig = rig();
    let answer = run(&rig, "dump", &["200000"]).await.unwrap();
    assert_eq!(answer.exit_code, 0, "the action was not blocked by the cap");
    assert_eq!(answer.stdout.len(), run::STDOUT_CAP);
}

/// What a hostile controller may send: every refusal below must come before anything is read or written.
mod hostile_controller {
    use super::*;

    fn restore_op(path: &Path, source: &Path, sha256: &str) -> v1::RestoreOp {
        v1::RestoreOp {
            backups: vec![v1::UpgradeBackup {
                path: path.display().to_string(),
                source: source.display().to_string(),
                size: 0,
                sha256: sha256.into(),
            }],
            call: None,
        }
    }

    fn sha256_of(bytes: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    }

    #[tokio::test]
    async fn a_restore_neither_reads_nor_writes_outside_the_roots_and_the_backup_area() {
        let rig = rig();
        let secret = rig.outside.join("shadow");
        std::fs::write(&secret, "root:hash\n").unwrap();
        let inside = rig.root.join("config.yaml");
        std::fs::write(&inside, CONFIG).unwrap();
        let dotted_area = rig.state.join("upgrade/../../outside/shadow");
        let cases = [
            // Reading a file outside into a root.
            (secret.clone(), inside.clone(), "root:hash\n".as_bytes()),
            // `..` out of the backup area.
            (dotted_area, inside.clone(), "root:hash\n".as_bytes()),
            // The state dir outside its backup area.
            (rig.state.join("agent.key"), inside.clone(), b"".as_slice()),
            // Overwriting a file outside through `source`.
            (inside.clone(), secret.clone(), CONFIG.as_bytes()),
            (
                inside.clone(),
                rig.root.join("../outside/shadow"),
                CONFIG.as_bytes(),
            ),
        ];
        for (path, source, bytes) in cases {
            let refused = rig
                .upgrades
                .restore(restore_op(&path, &source, &sha256_of(bytes)))
                .await
                .unwrap_err();
            assert!(
                matches!(refused, UpgradeError::Denied(_)),
                "{} -> {}: {refused}",
                path.display(),
                source.display()
            );
        }
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root:hash\n");
        assert_eq!(std::fs::read_to_string(&inside).unwrap(), CONFIG);
    }

    #[tokio::test]
    async fn a_symlinked_backup_area_or_restore_target_is_refused() {
        let rig = rig();
        let secret = rig.outside.join("shadow");
        std::fs::write(&secret, "root:hash\n").unwrap();
        std::os::unix::fs::symlink(&rig.outside, rig.state.join("upgrade")).unwrap();
        let through_area = rig.state.join("upgrade/shadow");
        let target = rig.root.join("copy");
        let refused = rig
            .upgrades
            .restore(restore_op(
                &through_area,
                &target,
                &sha256_of(b"root:hash\n"),
            ))
            .await
            .unwrap_err();
        assert!(matches!(refused, UpgradeError::Denied(_)), "{refused}");
        assert!(!target.exists());
        let file = rig.root.join("config.yaml");
        std::fs::write(&file, CONFIG).unwrap();
        let refused = rig
            .upgrades
            .backup_paths(
                area(),
                v1::BackupPathsOp {
                    paths: vec![file.display().to_string()],
                    min_bytes: 0,
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(refused, UpgradeError::Denied(_)), "{refused}");
        assert_eq!(
            std::fs::read_dir(&rig.outside).unwrap().count(),
            1,
            "nothing written through the symlinked backup area"
        );

        std::fs::create_dir_all(rig.root.join("sub")).unwrap();
        std::os::unix::fs::symlink(&rig.outside, rig.root.join("sub/link")).unwrap();
        let refused = rig
            .upgrades
            .restore(restore_op(
                &file,
                &rig.root.join("sub/link/shadow"),
                &sha256_of(CONFIG.as_bytes()),
            ))
            .await
            .unwrap_err();
        assert!(matches!(refused, UpgradeError::Denied(_)), "{refused}");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root:hash\n");
    }

    #[test]
    fn backup_area_names_cannot_escape_or_hold_odd_bytes() {
        let long = "a".repeat(129);
        for (id, step) in [
            ("..", "s"),
            ("u", ".."),
            ("u", "a\0b"),
            ("u\0", "s"),
            ("u", "a\nb"),
            ("/abs", "s"),
            ("u", "-rf"),
            (long.as_str(), "s"),
            ("u", long.as_str()),
        ] {
            assert!(
                matches!(backup_area(id, step), Err(UpgradeError::Invalid(_))),
                "{id:?} {step:?}"
            );
        }
        assert!(backup_area(&"a".repeat(128), "s").is_ok());
    }

    #[tokio::test]
    async fn arguments_cannot_smuggle_shell_syntax_options_or_lines() {
        let rig = rig();
        for (action, args) in [
            ("say", vec!["$(touch x)", "1"]),
            ("say", vec!["a;rm", "1"]),
            ("say", vec!["a|b", "1"]),
            ("say", vec!["`id`", "1"]),
            ("say", vec!["a\nb", "1"]),
            ("say", vec!["--help", "1"]),
            ("say", vec!["a", "-1"]),
            ("say", vec!["a", "1\n2"]),
            ("say", vec!["a", "99999999999999999999"]),
            ("say", vec!["a\0b", "1"]),
            ("mode", vec!["safe "]),
        ] {
            let refused = run(&rig, action, &args).await.unwrap_err();
            assert!(
                matches!(refused, UpgradeError::Invalid(_)),
                "{action} {args:?}: {refused}"
            );
        }
        let nul = format!("{}/a\0b", rig.root.display());
        let refused = rig
            .upgrades
            .restore(v1::RestoreOp {
                backups: vec![],
                call: call("load", &[&nul]),
            })
            .await
            .unwrap_err();
        assert!(matches!(refused, UpgradeError::Invalid(_)), "{refused}");
        let load = rig.upgrades.section.action("load").unwrap();
        let root = rig.root.display();
        for bad in [
            nul.clone(),
            "relative/path".into(),
            "-/x".into(),
            format!("{root}/x; rm -rf /"),
            format!("{root}/$(id)"),
            format!("{root}/`id`"),
            format!("{root}/a\nb"),
            format!("{root}/a b"),
            format!("{root}/a'b"),
            format!("{root}/a\"b"),
            format!("{root}/a|b"),
            format!("{root}/a>b"),
            format!("{root}/*"),
        ] {
            let refused = template::render(load, std::slice::from_ref(&bad), &rig.upgrades.roots)
                .unwrap_err();
            assert!(
                matches!(refused, UpgradeError::Invalid(_)),
                "{bad:?}: {refused}"
            );
        }
    }

    #[tokio::test]
    async fn undeclared_containers_are_refused_before_the_engine_is_asked() {
        let rig = rig();
        let refused = rig
            .upgrades
            .container_power(v1::ContainerPowerOp {
                container: "postgres".into(),
                start: false,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, UpgradeError::Denied(m) if m.contains("`postgres`") && m.contains("backend = \"docker\"")),
            "{refused}"
        );
        let refused = rig
            .upgrades
            .container_power(v1::ContainerPowerOp {
                container: String::new(),
                start: true,
            })
            .await
            .unwrap_err();
        assert!(matches!(refused, UpgradeError::Denied(_)), "{refused}");
        let refused = rig
            .upgrades
            .run_action(v1::RunActionOp {
                call: call("say", &["a", "1"]),
                container: "postgres".into(),
            })
            .await
            .unwrap_err();
        assert!(matches!(refused, UpgradeError::Denied(_)), "{refused}");
    }

    #[tokio::test]
    async fn a_yaml_edit_refuses_huge_edits_and_files_that_are_not_small_regular_files() {
        let rig = rig();
        let file = rig.root.join("config.yaml");
        std::fs::write(&file, CONFIG).unwrap();
        let huge_edits = format!(
            "[{}]",
            vec![r#"{"op":{"delete":"a"},"when":null}"#; 10_000].join(",")
        );
        let refused = rig
            .upgrades
            .yaml_edit(
                area(),
                v1::YamlEditOp {
                    file: file.display().to_string(),
                    edits_json: huge_edits,
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, UpgradeError::Invalid(m) if m.contains("edits_json")),
            "{refused}"
        );

        let fifo = rig.root.join("fifo.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let dir = rig.root.join("dir.yaml");
        std::fs::create_dir(&dir).unwrap();
        let big = rig.root.join("big.yaml");
        std::fs::write(&big, vec![b'#'; MAX_YAML_FILE_BYTES as usize + 1]).unwrap();
        for target in [&fifo, &dir, &big] {
            let edit = rig.upgrades.yaml_edit(
                area(),
                v1::YamlEditOp {
                    file: target.display().to_string(),
                    edits_json: "[]".into(),
                },
            );
            let refused = tokio::time::timeout(Duration::from_secs(20), edit)
                .await
                .unwrap_or_else(|_| panic!("{} blocked the step", target.display()))
                .unwrap_err();
            assert!(
                matches!(refused, UpgradeError::Precondition(_)),
                "{}: {refused}",
                target.display()
            );
        }
        assert!(
            !rig.state.join("upgrade").join("up-1").exists()
                || std::fs::read_dir(rig.state.join("upgrade/up-1/edit@n1"))
                    .map(|entries| entries.count() == 0)
                    .unwrap_or(true),
            "no backup was kept of a refused file"
        );
    }

    #[tokio::test]
    async fn a_fifo_named_as_a_backup_does_not_block_the_restore() {
        let rig = rig();
        let fifo = rig.root.join("dump.sql");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let target = rig.root.join("loaded");
        let restore = rig.upgrades.restore(v1::RestoreOp {
            backups: vec![v1::UpgradeBackup {
                path: fifo.display().to_string(),
                source: String::new(),
                size: 0,
                sha256: sha256_of(b""),
            }],
            call: call("load", &[&target.display().to_string()]),
        });
        let refused = tokio::time::timeout(Duration::from_secs(20), restore)
            .await
            .expect("the restore blocked on a FIFO")
            .unwrap_err();
        assert!(
            matches!(refused, UpgradeError::Precondition(_)),
            "{refused}"
        );
        assert!(!target.exists(), "the load action never ran");
    }
}
