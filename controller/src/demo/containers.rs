//! DEMO ONLY: `patchctl demo up --containers`: the demo workers run as Docker containers (backend `docker`) from
//! an image built locally from the stamped `demo-worker` (a `FROM scratch` build context holding the binary and the
//! shared libraries `ldd` lists; no registry, no pull), the way the OMS procedure runs its service: host network,
//! a bind-mounted data directory, ulimits, a restart policy, labels.
//!
//! The build context stays on disk (`<demo dir>/image/`), so a hotfix image is the same context with another
//! stamped binary: `docker build -t demo-worker:v1.0.1-hotfix <demo dir>/image`.

use super::DemoError;
use super::layout::{DemoHost, DemoService};
use bollard::models::{
    ContainerCreateBody, HostConfig, ResourcesUlimits, RestartPolicy, RestartPolicyNameEnum,
};
use patchd_docker::context::{scratch_dockerfile, scratch_files};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Repository of the demo worker image (`demo-worker:v1.0.0`): its component, as `package build --image` reads it.
pub const IMAGE_REPOSITORY: &str = "demo-worker";
/// Label every demo container carries, with the demo directory as value: `demo down` removes what carries it
/// (also a container the agent renamed aside mid-swap, since labels are carried over).
pub const DEMO_LABEL: &str = "io.patchd.demo";
/// Where the image runs the worker.
pub const ENTRYPOINT: &str = "/demo-worker";
/// What the agent adds to the environment of each new container (as the OMS procedure does).
pub const ENV_ADD: &str = "IS_UPGRADE=true";

/// The build context directory under the demo directory.
pub fn context_dir(demo_dir: &Path) -> PathBuf {
    demo_dir.join("image")
}

/// The container of a host's worker: unique per demo directory, so two demos never share a name.
pub fn container_name(demo_dir: &Path, host: &DemoHost, service: &DemoService) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        demo_dir.as_os_str().as_encoded_bytes(),
    );
    let short = hex::encode(&digest.as_ref()[..4]);
    format!(
        "patchd-demo-{short}-{}-{}",
        host.index,
        service.role.component()
    )
}

/// Writes the build context: `Dockerfile` and `rootfs/` with `binary` as `/demo-worker` plus its libraries (the
/// files of `patchd_docker::context::scratch_files`), packed with `patchd_docker::context::directory_context`.
pub fn write_context(context: &Path, binary: &Path) -> Result<(), DemoError> {
    let rootfs = context.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs).map_err(|e| DemoError::io("cannot clear", &rootfs, e))?;
    }
    std::fs::create_dir_all(&rootfs).map_err(|e| DemoError::io("cannot create", &rootfs, e))?;
    for file in scratch_files(&[(binary, Some(ENTRYPOINT))])? {
        let target = rootfs.join(file.inside.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| DemoError::io("cannot create", parent, e))?;
        }
        // `copy` follows symlinks: the image gets the library itself under the name the loader asks for.
        std::fs::copy(&file.host, &target)
            .map_err(|e| DemoError::io("cannot copy", &file.host, e))?;
    }
    let dockerfile = format!(
        "# DEMO ONLY: the demo worker image, written by `patchctl demo up --containers`.\n{}",
        scratch_dockerfile(&[ENTRYPOINT])
    );
    let path = context.join("Dockerfile");
    std::fs::write(&path, dockerfile).map_err(|e| DemoError::io("cannot write", &path, e))
}

/// The container of one worker: the image's entrypoint with the worker's arguments, host network (the worker
/// listens on its `127.0.1.k` address), a data directory bind-mounted from the host, a process-count ulimit, a
/// restart policy and the demo label.
pub fn worker_container(
    demo_dir: &Path,
    host: &DemoHost,
    image: &str,
    args: Vec<String>,
) -> ContainerCreateBody {
    let data = host.dir.join("container-data");
    ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(args),
        env: Some(vec![format!("DEMO_HOST={}", host.ip)]),
        labels: Some(HashMap::from([(
            DEMO_LABEL.to_owned(),
            demo_dir.to_string_lossy().into_owned(),
        )])),
        host_config: Some(HostConfig {
            binds: Some(vec![format!("{}:/data", data.to_string_lossy())]),
            network_mode: Some("host".to_owned()),
            ulimits: Some(vec![ResourcesUlimits {
                name: Some("nproc".to_owned()),
                soft: Some(65535),
                hard: Some(65535),
            }]),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_holds_the_binary_its_libraries_and_a_scratch_dockerfile() {
        let dir = tempfile::tempdir().unwrap();
        let binary = std::env::current_exe().unwrap();
        write_context(dir.path(), &binary).unwrap();
        let dockerfile = std::fs::read_to_string(dir.path().join("Dockerfile")).unwrap();
        assert!(dockerfile.contains("FROM scratch"), "{dockerfile}");
        assert!(dir.path().join("rootfs/demo-worker").is_file());
        let libc = patchd_docker::context::shared_libraries(&binary).unwrap();
        assert!(!libc.is_empty(), "a test binary links libc");
        for library in libc {
            let inside = dir
                .path()
                .join("rootfs")
                .join(library.strip_prefix("/").unwrap());
            assert!(inside.is_file(), "{} missing", inside.display());
        }
        let tar = patchd_docker::context::directory_context(dir.path()).unwrap();
        let names: Vec<String> = tar::Archive::new(tar.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n.ends_with("Dockerfile")), "{names:?}");
    }
}
