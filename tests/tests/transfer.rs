//! Package transfer end to end: byte-exact multi-chunk delivery, dedupe (a second push sends nothing, with the
//! chunk hashes from the sender's digest cache; a package just built by `patchctl package build` is pushed with the
//! hashes the build remembered; a rewritten file is hashed again; a wrong remembered digest is
//! refused by the agent, forgotten and the file hashed again), corrupt chunks refused and resent, a wrong final digest discarded, resume after the client and after the agent died
//! mid-transfer, and refusals for size limits and free disk space.

use bytes::Bytes;
use patchctl::agent::client::{AgentClient, PreparedBlob, PushOptions, PushReport};
use patchctl::agent::digest_cache::{CachedDigest, DigestCache, FileIdentity, RACY_WINDOW};
use patchctl::home::Home;
use patchctl::tls_files::ControllerTls;
use patchd_e2e::apply_support::version_1_upload;
use patchd_e2e::tmpfs::Tmpfs;
use patchd_e2e::{
    AgentConfig, AgentProcess, Pki, patchctl, patchctl_ok, sha256_file, write_random_file,
};
use patchd_package::digest::TreeVersion;
use patchd_proto::v1::{self, upload_message::Kind};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

const CHUNK: u32 = 256 * 1024;

struct Setup {
    dir: tempfile::TempDir,
    pki: Pki,
    config: AgentConfig,
    agent: AgentProcess,
}

fn setup(configure: impl FnOnce(AgentConfig) -> AgentConfig) -> Setup {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    let config = configure(AgentConfig::new(&dir.path().join("agent-1"), &tls));
    let agent = AgentProcess::start(&config.write());
    Setup {
        dir,
        pki,
        config,
        agent,
    }
}

impl Setup {
    fn file(&self, name: &str, len: u64, seed: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        write_random_file(&path, len, seed);
        path
    }

    fn push_json(&self, file: &Path) -> PushReport {
        let out = patchctl_ok(
            self.pki.home(),
            &[
                "--format",
                "json",
                "agent",
                "push",
                &self.agent.addr_string(),
                &file.to_string_lossy(),
                "--chunk-size",
                &CHUNK.to_string(),
            ],
        );
        parse_report(&out)
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.config.state_path().join("blobs").join(digest)
    }

    async fn client(&self) -> AgentClient {
        let tls = ControllerTls::load_dir(&self.pki.tls_dir()).unwrap();
        AgentClient::connect(&self.agent.addr_string(), &tls)
            .await
            .unwrap()
    }
}

fn parse_report(json: &str) -> PushReport {
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("bad JSON {json}: {e}"));
    PushReport {
        agent: v["agent"].as_str().unwrap().into(),
        digest: v["digest"].as_str().unwrap().parse().unwrap(),
        total_bytes: v["total_bytes"].as_u64().unwrap(),
        chunk_size: u32::try_from(v["chunk_size"].as_u64().unwrap()).unwrap(),
        chunks_total: v["chunks_total"].as_u64().unwrap(),
        chunks_skipped: v["chunks_skipped"].as_u64().unwrap(),
        chunks_sent: v["chunks_sent"].as_u64().unwrap(),
        bytes_sent: v["bytes_sent"].as_u64().unwrap(),
        retries: u32::try_from(v["retries"].as_u64().unwrap()).unwrap(),
        transfer_seconds: v["transfer_seconds"].as_f64().unwrap(),
        digest_seconds: v["digest_seconds"].as_f64().unwrap(),
        digest_cached: v["digest_cached"]
            .as_bool()
            .unwrap_or_else(|| panic!("no digest_cached in {json}")),
        mb_per_s: v["mb_per_s"].as_f64().unwrap(),
    }
}

fn chunk_message(blob: &PreparedBlob, data: &[u8], index: u64, corrupt: bool) -> v1::UploadMessage {
    let offset = index * u64::from(blob.chunk_size);
    let end = (offset + u64::from(blob.chunk_size)).min(blob.total_size);
    let bytes = &data[offset as usize..end as usize];
    let mut sha = patchd_package::digest::chunk_hash(bytes);
    if corrupt {
        sha[31] ^= 0x55;
    }
    v1::UploadMessage {
        kind: Some(Kind::Chunk(v1::UploadChunk {
            index,
            offset,
            data: Bytes::copy_from_slice(bytes),
            hash: Bytes::copy_from_slice(&sha),
        })),
    }
}

fn header(digest: &str, total_size: u64, chunk_size: u32) -> v1::UploadMessage {
    v1::UploadMessage {
        kind: Some(Kind::Header(v1::UploadHeader {
            blob: Some(v1::BlobRef {
                digest: digest.into(),
                total_size,
                chunk_size,
                tree_version: TreeVersion::CURRENT.wire(),
            }),
        })),
    }
}

async fn held(client: &mut AgentClient, blob: &PreparedBlob) -> u64 {
    client.query_blob(blob).await.unwrap().chunks_held
}

#[test]
fn multi_chunk_push_is_byte_exact_and_a_second_push_sends_nothing() {
    let s = setup(|c| c);
    let len = 9 * u64::from(CHUNK) + 12_345; // 10 chunks, the last one short
    let file = s.file("pkg.bin", len, 1);

    wait_out_racy_window(&file);
    let first = s.push_json(&file);
    assert_eq!(first.total_bytes, len);
    assert_eq!(first.chunks_total, 10);
    assert_eq!(first.bytes_sent, len);
    assert_eq!(first.chunks_sent, 10);
    assert_eq!(
        first.digest,
        patchd_package::digest::tree_digest_file(&file, CHUNK).unwrap()
    );
    let stored = s.blob_path(first.digest.as_str());
    assert_eq!(
        sha256_file(&stored),
        sha256_file(&file),
        "the stored blob is byte-exact"
    );
    assert!(
        std::fs::read_dir(s.config.state_path().join("blobs/partial"))
            .unwrap()
            .next()
            .is_none(),
        "no partial upload is left behind"
    );

    let second = s.push_json(&file);
    assert_eq!(second.digest, first.digest);
    assert_eq!(second.bytes_sent, 0, "the agent already holds the package");
    assert_eq!(second.chunks_sent, 0);
    assert_eq!(second.chunks_skipped, 10);
    assert!(!first.digest_cached, "a new file is hashed");
    assert!(
        second.digest_cached,
        "the same file's hashes are remembered"
    );

    // Other bytes of the same length in the same file: hashed again, sent whole.
    write_random_file(&file, len, 2);
    wait_out_racy_window(&file);
    let rewritten = s.push_json(&file);
    assert!(
        !rewritten.digest_cached,
        "a rewritten file misses the cache"
    );
    assert_ne!(rewritten.digest, first.digest);
    assert_eq!(
        rewritten.digest,
        patchd_package::digest::tree_digest_file(&file, CHUNK).unwrap()
    );
    assert_eq!(rewritten.bytes_sent, len);
    assert_eq!(
        sha256_file(&s.blob_path(rewritten.digest.as_str())),
        sha256_file(&file)
    );
}

/// Waits until the file's last change is older than the digest cache's racy window, so its hashes are remembered.
fn wait_out_racy_window(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    loop {
        let meta = std::fs::metadata(path).unwrap();
        let changed = Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32)
            .max(Duration::new(meta.mtime() as u64, meta.mtime_nsec() as u32));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        if now > changed + 2 * RACY_WINDOW {
            return;
        }
        std::thread::sleep(RACY_WINDOW / 4);
    }
}

#[test]
fn a_push_right_after_package_build_takes_its_hashes_from_the_build() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup(|c| c);
    let release = s.dir.path().join("release");
    let binary = release.join("demo-worker/demo-worker");
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    write_random_file(&binary, 3 * u64::from(CHUNK), 7);
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = s.dir.path().join("demo-worker-v1.0.0-linux-amd64.tar.gz");
    let tar = std::process::Command::new("tar")
        .current_dir(&release)
        .args(["czf", &base.to_string_lossy(), "demo-worker"])
        .output()
        .expect("GNU tar is installed");
    assert!(tar.status.success(), "{tar:?}");
    let hotfix_binary = s.file("demo-worker-hotfix", 3 * u64::from(CHUNK), 8);
    let package = s.dir.path().join("hotfix.tar.gz");
    patchctl_ok(
        s.pki.home(),
        &[
            "package",
            "build",
            "--base",
            &base.to_string_lossy(),
            "--replace",
            &format!("demo-worker/demo-worker={}", hotfix_binary.display()),
            "--version",
            "v1.0.1-hotfix",
            "-o",
            &package.to_string_lossy(),
        ],
    );

    // Right away, at the default chunk size: nothing in this test waits for the racy window.
    let pushed = parse_report(&patchctl_ok(
        s.pki.home(),
        &[
            "--format",
            "json",
            "agent",
            "push",
            &s.agent.addr_string(),
            &package.to_string_lossy(),
        ],
    ));
    assert!(
        pushed.digest_cached,
        "the build remembered the package's hashes"
    );
    assert_eq!(
        pushed.bytes_sent, pushed.total_bytes,
        "a new package is sent whole"
    );
    assert_eq!(
        pushed.digest,
        patchd_package::digest::tree_digest_file(
            &package,
            patchd_package::digest::DEFAULT_CHUNK_SIZE
        )
        .unwrap()
    );
    assert_eq!(
        sha256_file(&s.blob_path(pushed.digest.as_str())),
        sha256_file(&package)
    );
}

#[test]
fn a_wrong_remembered_digest_is_refused_forgotten_and_the_file_hashed_again() {
    let s = setup(|c| c);
    let len = 3 * u64::from(CHUNK) + 100;
    let file = s.file("pkg.bin", len, 11);
    let other = std::fs::read(s.file("other.bin", len, 12)).unwrap();
    // Plant the hashes of other bytes of the same length under this file's identity.
    let chunk_hashes: Vec<[u8; 32]> = other
        .chunks(CHUNK as usize)
        .map(patchd_package::digest::chunk_hash)
        .collect();
    let wrong = CachedDigest {
        digest: patchd_package::digest::tree_digest_reader(other.as_slice(), CHUNK, len)
            .unwrap()
            .parse()
            .unwrap(),
        chunk_hashes,
    };
    let cache = DigestCache::at(Home::at(s.pki.home()).digest_cache_dir());
    wait_out_racy_window(&file);
    let identity = FileIdentity::of(&std::fs::metadata(&file).unwrap());
    cache.store(&identity, CHUNK, &wrong);
    assert_eq!(cache.lookup(&identity, CHUNK), Some(wrong.clone()));

    let report = s.push_json(&file);
    let right: patchd_package::digest::TreeDigest =
        patchd_package::digest::tree_digest_file(&file, CHUNK)
            .unwrap()
            .parse()
            .unwrap();
    assert!(!report.digest_cached, "hashed again after the refusal");
    assert_eq!(report.digest, right);
    assert_eq!(
        sha256_file(&s.blob_path(right.as_str())),
        sha256_file(&file)
    );
    assert!(
        !s.blob_path(wrong.digest.as_str()).exists(),
        "nothing is stored under the wrong digest"
    );
    assert_eq!(
        cache.lookup(&identity, CHUNK).map(|entry| entry.digest),
        Some(right),
        "the right hashes replace the wrong ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_is_refused_then_resent_and_a_wrong_digest_is_discarded() {
    let s = setup(|c| c);
    let len = 5 * u64::from(CHUNK) + 7;
    let file = s.file("pkg.bin", len, 2);
    let data = std::fs::read(&file).unwrap();
    let blob = PreparedBlob::prepare(&file, CHUNK).await.unwrap();
    let mut client = s.client().await;

    // A chunk whose sha256 does not match its data: DATA_LOSS naming the offset; the chunks before it are kept.
    let messages = vec![
        header(blob.digest.as_str(), len, CHUNK),
        chunk_message(&blob, &data, 0, false),
        chunk_message(&blob, &data, 1, true),
    ];
    let status = client
        .raw()
        .upload(futures::stream::iter(messages))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains(&format!("offset {CHUNK}")),
        "the refusal names the offset: {}",
        status.message()
    );
    assert_eq!(held(&mut client, &blob).await, 1);
    assert!(!s.blob_path(blob.digest.as_str()).exists());

    // patchctl's sender resends a refused chunk on a new stream.
    let options = PushOptions {
        corrupt_chunk_once: Some(3),
        ..PushOptions::default()
    };
    let report = client.push(&blob, &options, |_| {}).await.unwrap();
    assert_eq!(report.retries, 1);
    assert_eq!(report.chunks_skipped, 1);
    assert_eq!(
        sha256_file(&s.blob_path(blob.digest.as_str())),
        sha256_file(&file)
    );

    // Every chunk is fine but the announced digest is not theirs: the partial upload is discarded.
    let other = s.file("other.bin", 2 * u64::from(CHUNK), 3);
    let other_data = std::fs::read(&other).unwrap();
    let other_blob = PreparedBlob::prepare(&other, CHUNK).await.unwrap();
    let fake_digest = "ab".repeat(32);
    let messages = vec![
        header(&fake_digest, other_blob.total_size, CHUNK),
        chunk_message(&other_blob, &other_data, 0, false),
        chunk_message(&other_blob, &other_data, 1, false),
    ];
    let status = client
        .raw()
        .upload(futures::stream::iter(messages))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let partial = s.config.state_path().join("blobs/partial");
    assert!(
        !partial.join(format!("{fake_digest}.part")).exists(),
        "the partial data was discarded"
    );
    assert!(!s.blob_path(&fake_digest).exists());
    let query = client
        .raw()
        .query_blob(v1::QueryBlobRequest {
            blob: Some(v1::BlobRef {
                digest: fake_digest,
                total_size: other_blob.total_size,
                chunk_size: CHUNK,
                tree_version: TreeVersion::CURRENT.wire(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((query.complete, query.chunks_held), (false, 0));
}

/// What a patchctl older than tree version 2 sends: no `tree_version`, a version-1 (sha256) digest and sha256 chunk
/// hashes. The agent verifies it as such, holds the blob under that digest and says which version it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_from_a_controller_before_tree_version_2_is_verified_as_sha256() {
    let s = setup(|c| c);
    let len = 3 * u64::from(CHUNK) + 11;
    let file = s.file("pkg.bin", len, 5);
    let data = std::fs::read(&file).unwrap();
    let (digest, messages) = version_1_upload(&data, CHUNK);
    assert_eq!(
        digest,
        TreeVersion::V1.tree_digest_file(&file, CHUNK).unwrap()
    );
    let old_ref = v1::BlobRef {
        digest: digest.clone(),
        total_size: len,
        chunk_size: CHUNK,
        tree_version: 0,
    };
    let mut client = s.client().await;
    let reply = client
        .raw()
        .upload(futures::stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.complete);
    assert_eq!(sha256_file(&s.blob_path(&digest)), sha256_file(&file));
    let query = client
        .raw()
        .query_blob(v1::QueryBlobRequest {
            blob: Some(old_ref),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(query.complete);
    assert_eq!(query.tree_version, TreeVersion::V1.wire());

    // patchctl of this version names the same file by its version-2 digest: another blob to the agent.
    let report = s.push_json(&file);
    assert_ne!(report.digest.as_str(), digest);
    assert_eq!(report.chunks_skipped, 0);
    assert_eq!(
        sha256_file(&s.blob_path(report.digest.as_str())),
        sha256_file(&file)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_resumes_after_the_client_and_then_the_agent_died_mid_transfer() {
    let mut s = setup(|c| c);
    let chunks = 12u64;
    let len = chunks * u64::from(CHUNK) - 1000;
    let file = s.file("pkg.bin", len, 4);
    let data = std::fs::read(&file).unwrap();
    let blob = PreparedBlob::prepare(&file, CHUNK).await.unwrap();

    // 1. The client dies after 4 chunks (its connection is dropped mid-stream).
    {
        let mut client = s.client().await;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(header(blob.digest.as_str(), len, CHUNK))
            .await
            .unwrap();
        for i in 0..4 {
            tx.send(chunk_message(&blob, &data, i, false))
                .await
                .unwrap();
        }
        let mut raw = client.raw().clone();
        let upload = tokio::spawn(async move { raw.upload(receiver_stream(rx)).await });
        let mut watcher = s.client().await;
        wait_for_held(&mut watcher, &blob, 4).await;
        upload.abort();
        drop(tx);
    }
    let mut watcher = s.client().await;
    assert_eq!(
        held(&mut watcher, &blob).await,
        4,
        "verified chunks survive the client's death"
    );

    // 2. The next sender continues at chunk 4, and the agent is SIGKILLed while the stream is open after chunk 8.
    let mut client = s.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(header(blob.digest.as_str(), len, CHUNK))
        .await
        .unwrap();
    for i in 4..8 {
        tx.send(chunk_message(&blob, &data, i, false))
            .await
            .unwrap();
    }
    let mut raw = client.raw().clone();
    let upload = tokio::spawn(async move { raw.upload(receiver_stream(rx)).await });
    wait_for_held(&mut watcher, &blob, 8).await;
    s.agent.kill();
    let result = tokio::time::timeout(Duration::from_secs(30), upload)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_err(), "the upload cannot succeed: the agent died");
    drop(tx);

    // 3. After a restart the push sends exactly the 4 missing chunks.
    s.agent.restart();
    let out = patchctl_ok(
        s.pki.home(),
        &[
            "--format",
            "json",
            "agent",
            "push",
            &s.agent.addr_string(),
            &file.to_string_lossy(),
            "--chunk-size",
            &CHUNK.to_string(),
        ],
    );
    let report = parse_report(&out);
    let expected = len - 8 * u64::from(CHUNK);
    assert_eq!(report.chunks_skipped, 8);
    assert_eq!(report.chunks_sent, 4);
    assert_eq!(report.bytes_sent, expected);
    assert!(report.bytes_sent < len);
    assert_eq!(
        sha256_file(&s.blob_path(blob.digest.as_str())),
        sha256_file(&file)
    );
}

fn receiver_stream(
    rx: tokio::sync::mpsc::Receiver<v1::UploadMessage>,
) -> impl futures::Stream<Item = v1::UploadMessage> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

async fn wait_for_held(client: &mut AgentClient, blob: &PreparedBlob, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = held(client, blob).await;
        if got == n {
            return;
        }
        assert!(got < n, "agent holds {got} chunks, more than the {n} sent");
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent never recorded {n} chunks (holds {got})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn packages_over_the_size_limit_or_the_free_disk_space_are_refused() {
    // limits.max_blob_bytes
    let s = setup(|c| c.limit("max_blob_bytes", "1048576"));
    let file = s.file("big.bin", 2 * 1024 * 1024, 5);
    let out = patchctl(
        s.pki.home(),
        &[
            "agent",
            "push",
            &s.agent.addr_string(),
            &file.to_string_lossy(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ResourceExhausted") && stderr.contains("max_blob_bytes"),
        "{stderr}"
    );

    // An announced size larger than the state directory's free space (real statvfs figure, nothing written).
    let s = setup(|c| c.limit("max_blob_bytes", "1152921504606846976"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        let mut client = s.client().await;
        let huge = 1u64 << 50; // 1 PiB
        client
            .raw()
            .upload(futures::stream::iter(vec![header(
                &"cd".repeat(32),
                huge,
                CHUNK,
            )]))
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("not enough disk space"),
        "{}",
        status.message()
    );
    assert!(
        std::fs::read_dir(s.config.state_path().join("blobs/partial"))
            .unwrap()
            .next()
            .is_none(),
        "nothing was written for the refused package"
    );
}

#[test]
fn a_push_that_does_not_fit_a_real_small_filesystem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount("8m");
    let mount_point = tmpfs.path.clone();

    let pki = Pki::new(dir.path());
    let tls = pki.issue_agent("agent-1", &["127.0.0.1"]);
    let config = AgentConfig::new(&dir.path().join("agent-1"), &tls)
        .state_dir(&mount_point.join("state"))
        .write();
    let mut agent = AgentProcess::start(&config);

    let small = dir.path().join("small.bin");
    write_random_file(&small, 2 * 1024 * 1024, 6);
    patchctl_ok(
        pki.home(),
        &[
            "agent",
            "push",
            &agent.addr_string(),
            &small.to_string_lossy(),
        ],
    );

    let big = dir.path().join("big.bin");
    write_random_file(&big, 16 * 1024 * 1024, 7);
    let out = patchctl(
        pki.home(),
        &[
            "agent",
            "push",
            &agent.addr_string(),
            &big.to_string_lossy(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ResourceExhausted") && stderr.contains("not enough disk space"),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(mount_point.join("state/blobs/partial"))
            .unwrap()
            .next()
            .is_none(),
        "nothing was written for the refused package"
    );
    agent.kill();
}
