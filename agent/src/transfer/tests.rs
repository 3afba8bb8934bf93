//! Tests of the blob store and the chunked upload: resume, crash points, bounds, space, direct I/O, pruning.

use super::writer::{DIRECT_IO_PIECE, Writer, open_direct};
use super::*;
use patchd_package::digest::tree_digest_reader;
use patchd_package::digest::{TreeVersion, chunk_hash};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The wire number of the tree version every new blob is named in.
const CURRENT: u32 = 2;

fn chunks_of(data: &[u8], chunk_size: u32) -> Vec<Chunk> {
    data.chunks(chunk_size as usize)
        .enumerate()
        .map(|(i, c)| Chunk {
            index: i as u64,
            offset: i as u64 * u64::from(chunk_size),
            data: Bytes::copy_from_slice(c),
            hash: chunk_hash(c),
        })
        .collect()
}

fn sample(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn writer_uses_direct_io_where_allowed_and_pads_only_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob.part");
    File::create(&path).unwrap();
    let direct = open_direct(&path);
    let supported = direct.is_some();
    let mut writer = Writer {
        part: OpenOptions::new().write(true).open(&path).unwrap(),
        direct,
        part_path: path.clone(),
        aligned: Vec::new(),
        reservation: None,
    };
    // Two chunks of 2 MiB (each written in pieces) and a tail that is not a whole block.
    let chunk = 2 * DIRECT_IO_PIECE;
    let data = sample(chunk * 2 + 100);
    // Out of order on purpose: each chunk lands at its own offset.
    writer.write(chunk as u64 * 2, &data[chunk * 2..]).unwrap();
    writer.write(chunk as u64, &data[chunk..chunk * 2]).unwrap();
    writer.write(0, &data[..chunk]).unwrap();
    assert_eq!(
        writer.direct.is_some(),
        supported,
        "direct I/O was refused mid-way"
    );
    let written = std::fs::read(&path).unwrap();
    assert_eq!(&written[..data.len()], &data[..]);
    if supported {
        // The tail block is padded with zeros; `finish` truncates the blob to its size.
        assert_eq!(written.len(), chunk * 2 + DIRECT_IO_ALIGN);
        assert!(written[data.len()..].iter().all(|&b| b == 0));
    } else {
        assert_eq!(written.len(), data.len());
    }
    // The ext4 of the test machines supports direct I/O: make sure this test exercised it there.
    let on_tmpfs = nix::sys::statfs::statfs(dir.path())
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(true);
    if !on_tmpfs {
        assert!(supported, "O_DIRECT refused on {}", dir.path().display());
    }
}

#[test]
fn writer_takes_aligned_memory_as_is_and_pads_its_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob.part");
    File::create(&path).unwrap();
    let mut writer = Writer {
        part: OpenOptions::new().write(true).open(&path).unwrap(),
        direct: open_direct(&path),
        part_path: path.clone(),
        aligned: Vec::new(),
        reservation: None,
    };
    let supported = writer.direct.is_some();
    let data = sample(DIRECT_IO_ALIGN * 3 + 123);
    let mut buf: Vec<u8> = Vec::with_capacity(data.len() + DIRECT_IO_ALIGN);
    let start = buf.as_ptr().align_offset(DIRECT_IO_ALIGN);
    buf.resize(start, 0);
    buf.extend_from_slice(&data);
    let aligned = &buf[start..];
    assert_eq!(aligned.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
    writer.write(0, aligned).unwrap();
    assert_eq!(writer.direct.is_some(), supported);
    let written = std::fs::read(&path).unwrap();
    assert_eq!(&written[..data.len()], &data[..]);
    if supported {
        assert_eq!(written.len(), DIRECT_IO_ALIGN * 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_in_two_parts_resumes_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
    let cs = MIN_CHUNK_SIZE;
    let data = sample(cs as usize * 5 + 100);
    let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs, CURRENT).unwrap();
    let chunks = chunks_of(&data, cs);

    let first = store
        .upload(
            blob.clone(),
            futures::stream::iter(chunks[..3].iter().cloned().map(Ok)),
        )
        .await
        .unwrap();
    assert_eq!(
        first,
        UploadOutcome {
            complete: false,
            chunks_received: 3,
            bytes_received: 3 * u64::from(cs)
        }
    );
    assert_eq!(store.query(&blob).unwrap().chunks_held, 3);

    // A restarted sender may resend held chunks: they are skipped.
    let second = store
        .upload(
            blob.clone(),
            futures::stream::iter(chunks[2..].iter().cloned().map(Ok)),
        )
        .await
        .unwrap();
    assert!(second.complete);
    assert_eq!(second.chunks_received, 3);
    assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
    // An old complete blob is touched when reported complete, so the cache pruning keeps it for a while.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 24 * 3600);
    std::fs::File::options()
        .write(true)
        .open(store.blob_path(&digest))
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert!(store.query(&blob).unwrap().complete);
    let modified = std::fs::metadata(store.blob_path(&digest))
        .unwrap()
        .modified()
        .unwrap();
    assert!(modified > old + std::time::Duration::from_secs(24 * 3600));
    assert!(!store.records_path(&digest).exists());
}

/// A controller older than tree version 2 sends no `tree_version` (0) and names its blob by a version-1 digest with
/// sha256 chunk hashes: the upload is accepted, resumes, and completes; BLAKE3 hashes under that header are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_upload_from_an_older_controller_is_verified_as_sha256_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
    let cs = MIN_CHUNK_SIZE;
    let data = sample(cs as usize * 4 + 7);
    let digest = TreeVersion::V1
        .tree_digest_reader(&data[..], cs, data.len() as u64)
        .unwrap();
    assert_ne!(
        digest,
        tree_digest_reader(&data[..], cs, data.len() as u64).unwrap()
    );
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs, 0).unwrap();
    assert_eq!(blob.version, TreeVersion::V1);
    let v1_chunks: Vec<Chunk> = chunks_of(&data, cs)
        .into_iter()
        .map(|mut chunk| {
            chunk.hash = TreeVersion::V1.chunk_hash(&chunk.data);
            chunk
        })
        .collect();

    // BLAKE3 chunk hashes under a version-1 header do not verify.
    let err = store
        .upload(
            blob.clone(),
            futures::stream::iter(chunks_of(&data, cs).into_iter().map(Ok)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::ChunkCorrupt { index: 0, .. }),
        "{err}"
    );

    let first = store
        .upload(
            blob.clone(),
            futures::stream::iter(v1_chunks[..2].iter().cloned().map(Ok)),
        )
        .await
        .unwrap();
    assert!(!first.complete);
    assert_eq!(store.query(&blob).unwrap().chunks_held, 2);
    let rest = store
        .upload(
            blob.clone(),
            futures::stream::iter(v1_chunks[2..].iter().cloned().map(Ok)),
        )
        .await
        .unwrap();
    assert!(rest.complete);
    assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);

    assert!(matches!(
        BlobRef::new(digest, data.len() as u64, cs, 3),
        Err(TransferError::UnknownTreeVersion(3))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_keeps_the_prefix_and_wrong_digest_discards() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
    let cs = MIN_CHUNK_SIZE;
    let data = sample(cs as usize * 4);
    let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
    let blob = BlobRef::new(digest, data.len() as u64, cs, CURRENT).unwrap();
    let mut chunks = chunks_of(&data, cs);
    chunks[2].hash[0] ^= 1;
    let err = store
        .upload(
            blob.clone(),
            futures::stream::iter(chunks.into_iter().map(Ok)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::ChunkCorrupt { index: 2, offset } if offset == 2 * u64::from(cs)),
        "{err}"
    );
    assert_eq!(store.query(&blob).unwrap().chunks_held, 2);

    let wrong = BlobRef::new("ab".repeat(32), data.len() as u64, cs, CURRENT).unwrap();
    let err = store
        .upload(
            wrong.clone(),
            futures::stream::iter(chunks_of(&data, cs).into_iter().map(Ok)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::DigestMismatch { .. }), "{err}");
    assert_eq!(store.query(&wrong).unwrap(), BlobState::default());
    assert!(!store.part_path(&wrong.digest).exists());
    assert!(!store.blob_path(&wrong.digest).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_chunk_is_refused_and_the_blob_has_its_exact_length() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
    let cs = MIN_CHUNK_SIZE;
    let data = sample(cs as usize * 2 + 100);
    let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs, CURRENT).unwrap();
    let mut chunks = chunks_of(&data, cs);
    store
        .upload(
            blob.clone(),
            futures::stream::iter(chunks[..1].iter().cloned().map(Ok)),
        )
        .await
        .unwrap();
    // A part file longer than the blob (e.g. left by an older agent) must not leak into the blob.
    let part = std::fs::File::options()
        .write(true)
        .open(store.part_path(&digest))
        .unwrap();
    part.write_all_at(b"trailing garbage", 3 * u64::from(cs))
        .unwrap();
    drop(part);

    let garbage = vec![0xEE_u8; cs as usize];
    chunks.push(Chunk {
        index: 3,
        offset: 3 * u64::from(cs),
        hash: chunk_hash(&garbage),
        data: Bytes::from(garbage),
    });
    let err = store
        .upload(
            blob.clone(),
            futures::stream::iter(chunks[1..].iter().cloned().map(Ok)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::Protocol(message) if message.contains("past the end")),
        "{err}"
    );
    assert!(!store.blob_path(&digest).exists());
    assert_eq!(store.query(&blob).unwrap().chunks_held, 3);

    // Resuming with nothing left to send completes the verified chunks.
    let outcome = store
        .upload(blob.clone(), futures::stream::empty())
        .await
        .unwrap();
    assert!(outcome.complete);
    assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_empty_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), 1000).unwrap());
    let big = BlobRef::new("00".repeat(32), 1001, MIN_CHUNK_SIZE, CURRENT).unwrap();
    assert!(matches!(
        store.upload(big, futures::stream::empty()).await,
        Err(TransferError::TooLarge { .. })
    ));
    let digest = tree_digest_reader(&[][..], MIN_CHUNK_SIZE, 0).unwrap();
    let empty = BlobRef::new(digest.clone(), 0, MIN_CHUNK_SIZE, CURRENT).unwrap();
    let outcome = store.upload(empty, futures::stream::empty()).await.unwrap();
    assert!(outcome.complete);
    assert_eq!(
        std::fs::metadata(store.blob_path(&digest)).unwrap().len(),
        0
    );
    assert!(BlobRef::new("../etc".into(), 1, MIN_CHUNK_SIZE, CURRENT).is_err());
}

#[test]
fn reservations_share_the_free_bytes_and_are_given_back() {
    let ledger = Arc::new(SpaceLedger::default());
    let dir = Path::new("/state/blobs");
    let mut first = ledger.reserve(60, || Ok(100), dir).unwrap();
    let err = ledger.reserve(50, || Ok(100), dir).unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::NoSpace {
                needed: 50,
                free: 40,
                reserved: 60,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("reserved by uploads in progress"),
        "{err}"
    );
    // Written bytes leave the ledger (the file system's own free figure now counts them).
    first.written(30);
    assert_eq!(ledger.reserved(), 30);
    drop(first);
    assert_eq!(ledger.reserved(), 0);
    let _second = ledger.reserve(50, || Ok(100), dir).unwrap();
    assert_eq!(ledger.reserved(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_limit_is_refused_and_its_reservation_freed() {
    let dir = tempfile::tempdir().unwrap();
    let bounds = UploadBounds {
        max_concurrent: 1,
        idle_timeout: Duration::from_secs(60),
    };
    let store = Arc::new(BlobStore::open_bounded(dir.path(), 1 << 30, bounds).unwrap());
    let cs = MIN_CHUNK_SIZE;
    let data = sample(cs as usize * 3);
    let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs, CURRENT).unwrap();

    // A silent upload holds the only slot and a reservation for what it has not written.
    let (tx, rx) = mpsc::channel::<Result<Chunk, TransferError>>(4);
    tx.send(Ok(chunks_of(&data, cs)[0].clone())).await.unwrap();
    let silent =
        {
            let store = Arc::clone(&store);
            let blob = blob.clone();
            tokio::spawn(async move {
                let chunks = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|c| (c, rx))
                });
                store.upload(blob, Box::pin(chunks)).await
            })
        };
    while store.query(&blob).unwrap().chunks_held < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.reserved_bytes(), 2 * u64::from(cs));

    let other = BlobRef::new("ab".repeat(32), 10, cs, CURRENT).unwrap();
    let err = store
        .upload(other.clone(), futures::stream::empty())
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::TooManyUploads { limit: 1 }),
        "{err}"
    );
    assert!(!store.part_path(&other.digest).exists());

    drop(tx);
    assert!(!silent.await.unwrap().unwrap().complete);
    assert_eq!(store.reserved_bytes(), 0);
    let rest = chunks_of(&data, cs).into_iter().skip(1).map(Ok);
    let done = store
        .upload(blob, futures::stream::iter(rest))
        .await
        .unwrap();
    assert!(done.complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_partial_uploads_are_pruned_unless_an_upload_holds_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
    let cs = MIN_CHUNK_SIZE;
    let data = sample(cs as usize * 3);
    let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs, CURRENT).unwrap();
    let first = chunks_of(&data, cs).into_iter().take(1).map(Ok);
    store
        .upload(blob.clone(), futures::stream::iter(first))
        .await
        .unwrap();
    assert!(store.part_path(&digest).exists() && store.records_path(&digest).exists());

    let held = store.locks.acquire(&digest).await;
    assert!(store.prune_partials(Duration::ZERO).is_empty());
    assert!(store.prune_partials(Duration::from_secs(3600)).is_empty());
    drop(held);
    assert!(
        store.prune_partials(Duration::from_secs(3600)).is_empty(),
        "young partial uploads are kept"
    );
    let removed = store.prune_partials(Duration::ZERO);
    assert_eq!(removed.len(), 2);
    assert_eq!(store.query(&blob).unwrap(), BlobState::default());
    assert_eq!(store.locks.in_use(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upload_parks_without_threads_and_goes_on_when_chunks_come() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
    let cs = MIN_CHUNK_SIZE;
    let data = sample(cs as usize * 3 + 10);
    let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs, CURRENT).unwrap();
    let chunks = chunks_of(&data, cs);

    let (tx, rx) = mpsc::channel::<Result<Chunk, TransferError>>(4);
    let upload =
        {
            let store = Arc::clone(&store);
            let blob = blob.clone();
            tokio::spawn(async move {
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|c| (c, rx))
                });
                store.upload(blob, Box::pin(stream)).await
            })
        };
    tx.send(Ok(chunks[0].clone())).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while store.query(&blob).unwrap().chunks_held < 1 || store.receiving_uploads() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent upload never parked (receiving: {})",
            store.receiving_uploads()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!upload.is_finished(), "parked, not ended");

    for chunk in &chunks[1..] {
        tx.send(Ok(chunk.clone())).await.unwrap();
    }
    drop(tx);
    let outcome = upload.await.unwrap().unwrap();
    assert!(outcome.complete);
    assert_eq!(outcome.chunks_received, 4);
    assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
    assert_eq!(store.reserved_bytes(), 0);
    assert_eq!(store.receiving_uploads(), 0);
}

/// Staging during the upload (`unpacker.rs`): what the upload leaves in `staging/`, compared with a Stage from the
/// blob as the agent did before.
mod staged_during_upload {
    use super::*;
    use patchd_apply::layout::StateLayout;
    use patchd_apply::prestage::PreStager;
    use patchd_apply::spec::ServiceSpec;
    use patchd_apply::stage::{StageError, stage_blocking};
    use patchd_package::{Limits, PackageError};
    use std::path::PathBuf;

    /// A store over `<dir>/state` that stages packages as they arrive, as the agent opens it.
    fn prestaging_store(dir: &Path) -> (PathBuf, Arc<BlobStore>) {
        let state = dir.join("state");
        let store = BlobStore::open(&StateLayout::new(&state).blobs(), 1 << 30)
            .unwrap()
            .with_prestage(PreStager::standalone(&state, Limits::default()));
        (state, Arc::new(store))
    }

    fn spec() -> ServiceSpec {
        toml::from_str("name = \"svc\"\ncomponent = \"svc\"\n").unwrap()
    }

    /// A package of component `svc` as `patchctl package build` makes them (manifest first): a binary of
    /// incompressible bytes, so that the package spans many chunks, and a config file.
    fn package(dir: &Path, version: &str) -> Vec<u8> {
        let src = dir.join(format!("src-{version}")).join("svc");
        std::fs::create_dir_all(src.join("conf")).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let binary: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(src.join("svc"), binary).unwrap();
        std::fs::write(src.join("conf/a.toml"), format!("version = {version:?}\n")).unwrap();
        let out = dir.join(format!("svc-{version}.tar.gz"));
        patchd_package::pack_dir(&src, version, &out).unwrap();
        std::fs::read(&out).unwrap()
    }

    /// A package that breaks a hostile-package rule: a setuid binary.
    fn setuid_package() -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        tar.append_data(&mut dir, "svc/", &b""[..]).unwrap();
        let mut file = tar::Header::new_gnu();
        file.set_entry_type(tar::EntryType::Regular);
        file.set_mode(0o4755);
        let data = b"#!/bin/sh\nexec /bin/sh\n";
        file.set_size(data.len() as u64);
        tar.append_data(&mut file, "svc/svc", &data[..]).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &tar.into_inner().unwrap()).unwrap();
        gz.finish().unwrap()
    }

    fn blob_of(data: &[u8]) -> BlobRef {
        let cs = MIN_CHUNK_SIZE;
        let digest = tree_digest_reader(data, cs, data.len() as u64).unwrap();
        BlobRef::new(digest, data.len() as u64, cs, CURRENT).unwrap()
    }

    /// What `staging/` holds: staged digests and temporaries alike.
    fn staging_entries(state: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(StateLayout::new(state).staging())
            .map(|listing| {
                listing
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Every entry of a staged package but its identity record (inode numbers and times differ by nature):
    /// path, mode and content.
    fn staged_tree(staged: &Path) -> Vec<(String, u32, Vec<u8>)> {
        use std::os::unix::fs::PermissionsExt;
        let mut out = Vec::new();
        let mut stack = vec![staged.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path
                    .strip_prefix(staged)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if rel == patchd_apply::staged_identity::RECORD_FILE {
                    continue;
                }
                let meta = std::fs::symlink_metadata(&path).unwrap();
                let mode = meta.permissions().mode() & 0o7777;
                if meta.is_dir() {
                    stack.push(path.clone());
                    out.push((rel, mode, Vec::new()));
                } else {
                    out.push((rel, mode, std::fs::read(&path).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    /// Stages `data` the way the agent did before: from the blob alone, in a state dir of its own.
    fn staged_from_blob(
        dir: &Path,
        blob: &BlobRef,
        data: &[u8],
    ) -> (PathBuf, Result<(), StageError>) {
        let state = dir.join("state-from-blob");
        let layout = StateLayout::new(&state);
        std::fs::create_dir_all(layout.blobs()).unwrap();
        std::fs::write(layout.blob(&blob.digest), data).unwrap();
        let staged = stage_blocking(&state, &blob.digest, &spec(), &Limits::default());
        if let Ok(staged) = &staged {
            assert!(!staged.already_staged);
        }
        (state, staged.map(|_| ()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_complete_upload_leaves_the_package_staged_as_a_stage_from_the_blob_would() {
        let dir = tempfile::tempdir().unwrap();
        let (state, store) = prestaging_store(dir.path());
        let data = package(dir.path(), "v2");
        let blob = blob_of(&data);
        assert!(blob.chunk_count() > 4, "the package spans several chunks");
        let chunks = chunks_of(&data, blob.chunk_size);
        let outcome = store
            .upload(
                blob.clone(),
                futures::stream::iter(chunks.into_iter().map(Ok)),
            )
            .await
            .unwrap();
        assert!(outcome.complete);
        assert_eq!(std::fs::read(store.blob_path(&blob.digest)).unwrap(), data);

        let layout = StateLayout::new(&state);
        assert_eq!(
            staging_entries(&state),
            [blob.digest.as_str()],
            "staged, no temporary left"
        );
        let staged = layout.staged(&blob.digest);
        assert!(staged.join("manifest.json").is_file());
        assert!(
            staged
                .join(patchd_apply::staged_identity::RECORD_FILE)
                .is_file()
        );
        assert!(staged.join("files/svc/svc").is_file());

        assert!(patchd_apply::stage::is_prestaged(&state, &blob.digest));

        // Stage finds it staged, checks it and claims it: reported staged now, nothing unpacked again.
        let inode =
            |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
        let binary_inode = inode(&staged.join("files/svc/svc"));
        let first = stage_blocking(&state, &blob.digest, &spec(), &Limits::default()).unwrap();
        assert!(
            !first.already_staged,
            "the first Stage reports it staged now"
        );
        assert_eq!(first.manifest.version, "v2");
        assert!(!patchd_apply::stage::is_prestaged(&state, &blob.digest));
        assert_eq!(
            inode(&staged.join("files/svc/svc")),
            binary_inode,
            "not unpacked again"
        );
        let again = stage_blocking(&state, &blob.digest, &spec(), &Limits::default()).unwrap();
        assert!(again.already_staged);
        assert_eq!(staging_entries(&state), [blob.digest.as_str()]);

        let (other, from_blob) = staged_from_blob(dir.path(), &blob, &data);
        from_blob.unwrap();
        let expected = staged_tree(&StateLayout::new(&other).staged(&blob.digest));
        assert!(
            expected
                .iter()
                .any(|(path, _, _)| path == "files/svc/conf/a.toml")
        );
        assert_eq!(
            staged_tree(&staged),
            expected,
            "byte-identical to a Stage from the blob"
        );
        let from_blob = stage_blocking(&other, &blob.digest, &spec(), &Limits::default()).unwrap();
        assert_eq!(first.manifest, from_blob.manifest);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_broken_mid_way_and_resumed_stages_nothing_and_stage_unpacks_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let (state, store) = prestaging_store(dir.path());
        let data = package(dir.path(), "v2");
        let blob = blob_of(&data);
        let chunks = chunks_of(&data, blob.chunk_size);

        let broken = chunks[..3]
            .iter()
            .cloned()
            .map(Ok)
            .chain(std::iter::once(Err(TransferError::StreamBroken(
                "connection reset".into(),
            ))));
        let err = store
            .upload(blob.clone(), futures::stream::iter(broken))
            .await
            .unwrap_err();
        assert!(matches!(err, TransferError::StreamBroken(_)), "{err}");
        assert!(
            staging_entries(&state).is_empty(),
            "{:?}",
            staging_entries(&state)
        );

        let rest = chunks[3..].iter().cloned().map(Ok);
        let outcome = store
            .upload(blob.clone(), futures::stream::iter(rest))
            .await
            .unwrap();
        assert!(outcome.complete);
        assert!(
            staging_entries(&state).is_empty(),
            "a resumed upload stages nothing: {:?}",
            staging_entries(&state)
        );

        let staged = stage_blocking(&state, &blob.digest, &spec(), &Limits::default()).unwrap();
        assert!(!staged.already_staged);
        let (other, from_blob) = staged_from_blob(dir.path(), &blob, &data);
        from_blob.unwrap();
        assert_eq!(
            staged_tree(&StateLayout::new(&state).staged(&blob.digest)),
            staged_tree(&StateLayout::new(&other).staged(&blob.digest))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hostile_package_uploads_but_is_not_staged_and_stage_refuses_it_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let (state, store) = prestaging_store(dir.path());
        let data = setuid_package();
        let blob = blob_of(&data);
        let outcome = store
            .upload(
                blob.clone(),
                futures::stream::iter(chunks_of(&data, blob.chunk_size).into_iter().map(Ok)),
            )
            .await
            .unwrap();
        assert!(
            outcome.complete,
            "the upload itself does not judge the package"
        );
        assert!(store.blob_path(&blob.digest).is_file());
        assert!(
            staging_entries(&state).is_empty(),
            "{:?}",
            staging_entries(&state)
        );

        let refused =
            stage_blocking(&state, &blob.digest, &spec(), &Limits::default()).unwrap_err();
        assert!(
            matches!(&refused, StageError::Package { source, .. }
                if matches!(**source, PackageError::SpecialModeBits { .. })),
            "{refused:?}"
        );
        let (_, before) = staged_from_blob(dir.path(), &blob, &data);
        assert_eq!(
            refused.to_string(),
            before.unwrap_err().to_string(),
            "the same error as before"
        );
        assert!(staging_entries(&state).is_empty());
    }
}
