//! A package staged during its upload (`prestage`: refused by Apply until a Stage checked it, which reports it
//! staged now), and an existing staged tree checked against stage's identity record before it is reused: edits are
//! found (then the blob is unpacked again), a damaged blob refused.
use super::*;
use crate::stage::StageError;
use crate::staged_identity::{FileIdentity, Identities, RECORD_FILE, verify_staged};

/// Stages `digest` the way an upload does: the blob's bytes through the pre-stager, then published.
async fn prestage(engine: &Engine, host: &Host, digest: &str) {
    let prestager = engine.prestager();
    let blob = host.state.join("blobs").join(digest);
    let size = std::fs::metadata(&blob).unwrap().len();
    let temp = prestager.temp_dir(digest);
    let manifest = prestager
        .unpack(
            digest,
            &mut std::io::BufReader::new(std::fs::File::open(&blob).unwrap()),
            size,
            &temp,
            &prestager.limits(),
        )
        .unwrap();
    assert!(prestager.publish(digest, temp, manifest).await.unwrap());
}

fn staging_entries(host: &Host) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(host.state.join("staging"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Flips one byte in the middle of `path`, in place (a bad sector, a stray write).
fn flip_middle_byte(path: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let middle = file.metadata().unwrap().len() / 2;
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(middle)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(middle)).unwrap();
    file.write_all(&[byte[0] ^ 0x5a]).unwrap();
}

/// Rewrites `path` in place with other bytes of the same length and gives it back its modification time: only
/// the change time tells.
fn edit_in_place_keeping_mtime(path: &Path, content: &[u8]) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    assert_eq!(std::fs::metadata(path).unwrap().len(), content.len() as u64);
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, content, 0).unwrap();
    file.set_modified(mtime).unwrap();
}

#[tokio::test]
async fn the_first_stage_of_a_package_staged_during_its_upload_reports_it_staged_now() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    prestage(&engine, &host, &digest).await;
    assert_eq!(staging_entries(&host), [digest.as_str()]);
    // Not staged as far as Apply goes until a Stage has checked it.
    let err = engine.apply(apply_cmd(&digest, "p0")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("call Stage"), "{err}");
    assert_eq!(host.binary(), "binary v1");

    let first = engine.stage("svc", &digest).await.unwrap();
    assert!(!first.already_staged, "no Stage had staged it before");
    assert_eq!(first.manifest.version, "v2");
    let again = engine.stage("svc", &digest).await.unwrap();
    assert!(again.already_staged);
    let report = engine.apply(apply_cmd(&digest, "p1")).await.unwrap();
    assert_eq!(
        report.result.outcome,
        Outcome::Committed,
        "{:?}",
        report.result
    );
    assert_eq!(host.binary(), "binary v2");
}

#[tokio::test]
async fn a_staged_file_edited_after_staging_is_hashed_found_and_staged_again_unless_the_blob_is_damaged()
 {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    prestage(&engine, &host, &digest).await;
    let staged = host
        .state
        .join("staging")
        .join(&digest)
        .join("files/svc/svc");

    edit_in_place_keeping_mtime(&staged, b"binary X2");
    let restaged = engine.stage("svc", &digest).await.unwrap();
    assert!(!restaged.already_staged);
    assert_eq!(
        std::fs::read_to_string(&staged).unwrap(),
        "binary v2",
        "unpacked again from the blob"
    );
    assert_eq!(staging_entries(&host), [digest.as_str()]);

    // The staged copy and the blob both damaged: nothing sound is left to stage from.
    edit_in_place_keeping_mtime(&staged, b"binary X2");
    let blob = host.state.join("blobs").join(&digest);
    flip_middle_byte(&blob);
    let err = engine.stage("svc", &digest).await.unwrap_err();
    assert!(
        matches!(err, ApplyError::Stage(StageError::BlobCorrupt { .. })),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("upload it again"), "{err}");
    assert!(
        staging_entries(&host).is_empty(),
        "{:?}",
        staging_entries(&host)
    );
    assert!(!blob.exists(), "the damaged blob left the cache");
    let err = engine.apply(apply_cmd(&digest, "p1")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(host.binary(), "binary v1");
}

#[tokio::test]
async fn a_staged_file_whose_identity_equals_the_record_is_not_read_again() {
    let host = Host::new();
    let engine = host.engine().await.unwrap();
    let digest = host.package("v2", V2);
    engine.stage("svc", &digest).await.unwrap();
    let dir = host.state.join("staging").join(&digest);
    let manifest = crate::stage::load_staged(&host.state, &digest)
        .unwrap()
        .unwrap();
    verify_staged(&host.state, &digest, &manifest).unwrap();

    // Changed content: the identity no longer matches, so the file is read and the change found.
    let staged = dir.join("files/svc/svc");
    edit_in_place_keeping_mtime(&staged, b"binary X2");
    assert!(verify_staged(&host.state, &digest, &manifest).is_err());
    // A record naming the changed file's own identity vouches for it: proof that it is not read then.
    let record_path = dir.join(RECORD_FILE);
    let mut record: Identities =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    let meta = std::fs::symlink_metadata(&staged).unwrap();
    record.insert("svc/svc".into(), FileIdentity::of_metadata(&meta));
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    verify_staged(&host.state, &digest, &manifest).unwrap();
    // Without a record, every file is read.
    std::fs::remove_file(&record_path).unwrap();
    assert!(verify_staged(&host.state, &digest, &manifest).is_err());
}
