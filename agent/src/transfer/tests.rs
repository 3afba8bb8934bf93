//! Tests of the blob store and the chunked upload: resume, crash points, bounds, space, direct I/O, pruning.

use super::writer::{DIRECT_IO_PIECE, Writer, open_direct};
use super::*;
use patchd_package::digest::chunk_sha256;
use patchd_package::digest::tree_digest_reader;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::mpsc;

fn chunks_of(data: &[u8], chunk_size: u32) -> Vec<Chunk> {
    data.chunks(chunk_size as usize)
        .enumerate()
        .map(|(i, c)| Chunk {
            index: i as u64,
            offset: i as u64 * u64::from(chunk_size),
            data: Bytes::copy_from_slice(c),
            sha256: chunk_sha256(c),
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
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_keeps_the_prefix_and_wrong_digest_discards() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
    let cs = MIN_CHUNK_SIZE;
    let data = sample(cs as usize * 4);
    let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
    let blob = BlobRef::new(digest, data.len() as u64, cs).unwrap();
    let mut chunks = chunks_of(&data, cs);
    chunks[2].sha256[0] ^= 1;
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

    let wrong = BlobRef::new("ab".repeat(32), data.len() as u64, cs).unwrap();
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
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs).unwrap();
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
        sha256: chunk_sha256(&garbage),
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
    let big = BlobRef::new("00".repeat(32), 1001, MIN_CHUNK_SIZE).unwrap();
    assert!(matches!(
        store.upload(big, futures::stream::empty()).await,
        Err(TransferError::TooLarge { .. })
    ));
    let digest = tree_digest_reader(&[][..], MIN_CHUNK_SIZE, 0).unwrap();
    let empty = BlobRef::new(digest.clone(), 0, MIN_CHUNK_SIZE).unwrap();
    let outcome = store.upload(empty, futures::stream::empty()).await.unwrap();
    assert!(outcome.complete);
    assert_eq!(
        std::fs::metadata(store.blob_path(&digest)).unwrap().len(),
        0
    );
    assert!(BlobRef::new("../etc".into(), 1, MIN_CHUNK_SIZE).is_err());
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
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs).unwrap();

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

    let other = BlobRef::new("ab".repeat(32), 10, cs).unwrap();
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
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs).unwrap();
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
    assert!(store.locks.map.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upload_parks_without_threads_and_goes_on_when_chunks_come() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
    let cs = MIN_CHUNK_SIZE;
    let data = sample(cs as usize * 3 + 10);
    let digest = tree_digest_reader(&data[..], cs, data.len() as u64).unwrap();
    let blob = BlobRef::new(digest.clone(), data.len() as u64, cs).unwrap();
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
