//! Tests of the file-system primitives: durable writes, the hash cache, confined placement.

use super::*;
use patchd_package::ContentAlgorithm;
use rustix::fs::{Mode, OFlags};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::MetadataExt;

#[test]
fn write_atomic_replaces_content_and_leaves_no_temp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.json");
    write_atomic(&path, b"one").unwrap();
    write_atomic(&path, b"two").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"two");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn persisted_hash_cache_survives_a_restart_but_not_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    fs::write(&file, b"content").unwrap();
    let store = dir.path().join("hashes.json");
    let cache = HashCache::persistent(&store);
    cache.remember(&file, "blake3:not-the-real-hash");
    cache.save();
    // The remembered value is used after a reload (proving it came from the file), while the file is unchanged.
    let reloaded = HashCache::persistent(&store);
    assert_eq!(
        reloaded
            .digest(&file, ContentAlgorithm::CURRENT)
            .unwrap()
            .as_deref(),
        Some("blake3:not-the-real-hash")
    );
    // Entries are kept per algorithm: the BLAKE3 entry does not answer for sha256.
    assert_eq!(
        reloaded.digest(&file, ContentAlgorithm::Sha256).unwrap(),
        Some(digest_file(&file, ContentAlgorithm::Sha256).unwrap())
    );
    // A cache file written before manifest format 2 (sha256 digests under `sha256`) is read, as sha256.
    let old = fs::read_to_string(&store).unwrap().replace(
        "\"digest\":\"blake3:not-the-real-hash\"",
        "\"sha256\":\"old-hash\"",
    );
    fs::write(&store, old).unwrap();
    let reloaded = HashCache::persistent(&store);
    assert_eq!(
        reloaded
            .digest(&file, ContentAlgorithm::Sha256)
            .unwrap()
            .as_deref(),
        Some("old-hash")
    );
    let other = dir.path().join("g");
    fs::write(&other, b"changed").unwrap();
    fs::rename(&other, &file).unwrap();
    let reloaded = HashCache::persistent(&store);
    assert_eq!(
        reloaded.digest(&file, ContentAlgorithm::CURRENT).unwrap(),
        Some(digest_file(&file, ContentAlgorithm::CURRENT).unwrap())
    );
}

#[test]
fn hash_cache_notices_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    fs::write(&path, b"a").unwrap();
    let cache = HashCache::default();
    let a = cache
        .digest(&path, ContentAlgorithm::CURRENT)
        .unwrap()
        .unwrap();
    assert_eq!(a, digest_file(&path, ContentAlgorithm::CURRENT).unwrap());
    let other = dir.path().join("g");
    fs::write(&other, b"b").unwrap();
    fs::rename(&other, &path).unwrap();
    let b = cache
        .digest(&path, ContentAlgorithm::CURRENT)
        .unwrap()
        .unwrap();
    assert_ne!(a, b);
    assert_eq!(
        cache
            .digest(&dir.path().join("missing"), ContentAlgorithm::CURRENT)
            .unwrap(),
        None
    );
}

#[test]
fn hash_cache_notices_an_in_place_rewrite_with_the_mtime_set_back() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    fs::write(&path, b"good").unwrap();
    let good = digest_file(&path, ContentAlgorithm::CURRENT).unwrap();
    let cache = HashCache::default();
    cache.remember(&path, &good);
    assert_eq!(
        cache
            .digest(&path, ContentAlgorithm::CURRENT)
            .unwrap()
            .as_deref(),
        Some(good.as_str())
    );
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all(b"evil").unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    assert_eq!(
        cache.digest(&path, ContentAlgorithm::CURRENT).unwrap(),
        Some(digest_file(&path, ContentAlgorithm::CURRENT).unwrap())
    );
}

#[test]
fn a_file_changed_just_now_is_hashed_but_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    fs::write(&path, b"fresh").unwrap();
    let cache = HashCache::default();
    assert_eq!(
        cache.digest(&path, ContentAlgorithm::CURRENT).unwrap(),
        Some(digest_file(&path, ContentAlgorithm::CURRENT).unwrap())
    );
    assert!(
        cache.entries.lock().unwrap().is_empty(),
        "racily clean: not cached"
    );
}

#[test]
fn a_file_with_sub_second_times_is_cached_once_a_few_ticks_old() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    fs::write(&path, b"settled").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(60));
    let cache = HashCache::default();
    cache.digest(&path, ContentAlgorithm::CURRENT).unwrap();
    assert!(
        cache
            .entries
            .lock()
            .unwrap()
            .contains_key(&(path, ContentAlgorithm::CURRENT))
    );
}

#[test]
fn a_dir_handle_refuses_symlinks_and_never_copies_over_an_entry() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("victim"), b"outside").unwrap();
    fs::create_dir(dir.path().join("real")).unwrap();
    fs::write(dir.path().join("real/source"), b"new").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
    let handle = DirHandle::open_trusted(dir.path()).unwrap();
    // A symlinked directory on the way, or as the directory to create, is refused.
    let err = handle.open_dir(Path::new("link")).unwrap_err();
    assert_eq!(
        err.source.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{err}"
    );
    assert!(handle.create_dir(Path::new("link")).is_err());
    assert!(handle.open_dir(Path::new("real/../..")).is_err());
    let source = At {
        dir: &handle,
        rel: Path::new("real/source"),
    };
    let into_link = At {
        dir: &handle,
        rel: Path::new("link/victim"),
    };
    assert!(materialize_at(source, into_link, None, None).is_err());
    // A symlink at the temporary's own name is removed, never written through, even for a copy.
    std::os::unix::fs::symlink(outside.path().join("victim"), dir.path().join("real/temp"))
        .unwrap();
    let temp = At {
        dir: &handle,
        rel: Path::new("real/temp"),
    };
    materialize_at(source, temp, Some(0o640), Some((65534, 65534))).unwrap();
    assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"outside");
    let meta = fs::symlink_metadata(dir.path().join("real/temp")).unwrap();
    assert!(meta.is_file());
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (65534, 65534, 0o640)
    );
    assert_eq!(fs::read(dir.path().join("real/temp")).unwrap(), b"new");
    assert_eq!(
        handle
            .digest(Path::new("real/temp"), ContentAlgorithm::CURRENT)
            .unwrap(),
        digest_file(&dir.path().join("real/source"), ContentAlgorithm::CURRENT).unwrap()
    );
}

#[test]
fn the_walk_without_openat2_refuses_the_same_paths() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("a/b")).unwrap();
    fs::write(dir.path().join("a/b/f"), b"x").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("a/link")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("a/b/f"), dir.path().join("a/flink")).unwrap();
    let handle = DirHandle::open_trusted(dir.path()).unwrap();
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let file_flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let walk = |rel: &str, flags| handle.open_by_components(Path::new(rel), flags, Mode::empty());
    assert!(walk("a/b", dir_flags).is_ok());
    assert!(walk("", dir_flags).is_ok());
    assert!(walk("a/b/f", file_flags).is_ok());
    assert!(walk("a/link", dir_flags).is_err());
    assert!(walk("a/link/x", file_flags).is_err());
    assert!(walk("a/flink", file_flags).is_err());
    assert!(walk("a/../..", dir_flags).is_err());
}
