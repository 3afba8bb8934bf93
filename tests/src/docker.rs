//! The container tests' access to the real Docker Engine, through its API on the Unix socket (bollard): connect
//! (failing, never skipping, when no engine answers), build a local image from a project binary (a `FROM scratch`
//! root file system holding the binary and the shared libraries `ldd` lists: no registry, no pull), `docker save`
//! an image to a tar, create and inspect containers, and remove on drop every container and image a test made.
//!
//! ```no_run
//! use patchd_e2e::docker::DockerTest;
//! let docker = DockerTest::connect("ct-example");         // names start with `patchd-test-ct-example-<pid>`
//! let image = docker.build_image(
//!     &docker.name("worker:v1"),
//!     &patchd_e2e::bin("demo-worker"),
//!     &["/demo-worker", "serve", "--listen", "127.0.0.1:0"],
//! );
//! docker.save_image(&image, std::path::Path::new("/tmp/worker-v1.tar"));
//! // every container whose name starts with the prefix, and every image built here, is removed on drop
//! ```

use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, ImageInspect};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, StartContainerOptions,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The engine's socket the tests (and the agent's default `docker_socket`) use.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// A connection to the engine for one test, and the objects it made (removed on drop).
pub struct DockerTest {
    runtime: tokio::runtime::Runtime,
    docker: Docker,
    prefix: String,
    images: Mutex<Vec<String>>,
}

impl DockerTest {
    /// Connects to the engine on [`DOCKER_SOCKET`]; panics naming the socket when no engine answers there (the
    /// container tests fail rather than skip: `scripts/test.sh` installs and starts `dockerd`). `test` names the
    /// test: every object made here is named `patchd-test-<test>-<pid>-...`.
    pub fn connect(test: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build a tokio runtime: {e}"));
        let docker = runtime.block_on(async {
            let docker =
                Docker::connect_with_unix(DOCKER_SOCKET, 120, bollard::API_DEFAULT_VERSION)
                    .unwrap_or_else(|e| panic!("{}", no_engine(&e.to_string())));
            let docker = docker
                .negotiate_version()
                .await
                .unwrap_or_else(|e| panic!("{}", no_engine(&e.to_string())));
            docker
                .ping()
                .await
                .unwrap_or_else(|e| panic!("{}", no_engine(&e.to_string())));
            docker
        });
        DockerTest {
            runtime,
            docker,
            prefix: format!("patchd-test-{test}-{}", std::process::id()),
            images: Mutex::new(Vec::new()),
        }
    }

    /// `<prefix>-<what>`: a name for a container or an image reference of this test.
    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    /// The prefix of every name this test uses.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bollard client, for calls the helper does not wrap.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Runs a future on the helper's runtime.
    pub fn block_on<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    /// Builds image `tag` (`name:tag`) from scratch: `binary` at `/<file name>` plus the shared libraries `ldd`
    /// lists at their own paths, with `entrypoint`. Returns the image ID (`sha256:...`); removed on drop.
    pub fn build_image(&self, tag: &str, binary: &Path, entrypoint: &[&str]) -> String {
        self.build_image_with(tag, &[(binary, None)], entrypoint)
    }

    /// Like [`DockerTest::build_image`] with several files: each `(host path, Some(path in the image))` (default
    /// `/<file name>`), and the shared libraries of each.
    pub fn build_image_with(
        &self,
        tag: &str,
        files: &[(&Path, Option<&str>)],
        entrypoint: &[&str],
    ) -> String {
        let context = build_context(files, entrypoint);
        let options = BuildImageOptionsBuilder::default()
            .dockerfile("Dockerfile")
            .t(tag)
            .rm(true)
            .forcerm(true)
            .build();
        let id = self.runtime.block_on(async {
            let mut stream =
                self.docker
                    .build_image(options, None, Some(bollard::body_full(context.into())));
            let mut log = String::new();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(info) => {
                        if let Some(line) = info.stream {
                            log.push_str(&line);
                        }
                        if let Some(error) = info.error_detail.and_then(|d| d.message) {
                            panic!("building image {tag} failed: {error}\n{log}");
                        }
                    }
                    Err(e) => panic!("building image {tag} failed: {e}\n{log}"),
                }
            }
            self.docker
                .inspect_image(tag)
                .await
                .unwrap_or_else(|e| panic!("image {tag} is missing after its build: {e}\n{log}"))
                .id
                .unwrap_or_else(|| panic!("image {tag} has no ID"))
        });
        self.track_image(&id);
        id
    }

    /// `docker save` of `image` into `out` (an uncompressed tar, as `docker load -i` reads).
    pub fn save_image(&self, image: &str, out: &Path) {
        self.runtime.block_on(async {
            let mut file = std::fs::File::create(out)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", out.display()));
            let mut stream = self.docker.export_image(image);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.unwrap_or_else(|e| panic!("saving image {image} failed: {e}"));
                file.write_all(&chunk)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
            }
            file.sync_all()
                .unwrap_or_else(|e| panic!("cannot sync {}: {e}", out.display()));
        });
    }

    /// Removes on drop an image this test got some other way (loaded by an agent, say).
    pub fn track_image(&self, id: &str) {
        let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        if !images.iter().any(|known| known == id) {
            images.push(id.to_string());
        }
    }

    /// Creates container `name` (which must start with the prefix, so drop removes it) from `body`; with
    /// `start`, starts it (as `docker run -d` does). Returns its ID.
    pub fn create_container(&self, name: &str, body: ContainerCreateBody, start: bool) -> String {
        assert!(
            name.starts_with(&self.prefix),
            "container {name} must be named with the test prefix {} so it is removed",
            self.prefix
        );
        self.runtime.block_on(async {
            let options = CreateContainerOptionsBuilder::default().name(name).build();
            let created = self
                .docker
                .create_container(Some(options), body)
                .await
                .unwrap_or_else(|e| panic!("creating container {name} failed: {e}"));
            if start {
                self.docker
                    .start_container(&created.id, None::<StartContainerOptions>)
                    .await
                    .unwrap_or_else(|e| panic!("starting container {name} failed: {e}"));
            }
            created.id
        })
    }

    /// `docker inspect` of a container by name or ID; `None` when there is none.
    pub fn inspect_container(&self, name: &str) -> Option<ContainerInspectResponse> {
        self.runtime.block_on(async {
            match self.docker.inspect_container(name, None).await {
                Ok(found) => Some(found),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => None,
                Err(e) => panic!("inspecting container {name} failed: {e}"),
            }
        })
    }

    /// `docker image inspect`; `None` when there is none.
    pub fn inspect_image(&self, image: &str) -> Option<ImageInspect> {
        self.runtime.block_on(async {
            match self.docker.inspect_image(image).await {
                Ok(found) => Some(found),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => None,
                Err(e) => panic!("inspecting image {image} failed: {e}"),
            }
        })
    }

    /// Names (without the leading `/`) of every container, running or not, whose name starts with `prefix`.
    pub fn containers_named(&self, prefix: &str) -> Vec<String> {
        self.runtime.block_on(async {
            let filters = HashMap::from([("name", vec![prefix])]);
            let options = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            let listed = self
                .docker
                .list_containers(Some(options))
                .await
                .unwrap_or_else(|e| panic!("listing containers failed: {e}"));
            let mut names: Vec<String> = listed
                .into_iter()
                .flat_map(|c| c.names.unwrap_or_default())
                .map(|n| n.trim_start_matches('/').to_string())
                .filter(|n| n.starts_with(prefix))
                .collect();
            names.sort();
            names
        })
    }

    /// Removes a container (running or not) by name or ID; absent is fine.
    pub fn remove_container(&self, name: &str) {
        self.runtime.block_on(async {
            let options = RemoveContainerOptionsBuilder::default().force(true).build();
            match self.docker.remove_container(name, Some(options)).await {
                Ok(())
                | Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => eprintln!("cannot remove container {name}: {e}"),
            }
        });
    }

    /// Removes an image by ID or reference; absent is fine.
    pub fn remove_image(&self, image: &str) {
        self.runtime.block_on(async {
            let options = RemoveImageOptionsBuilder::default().force(true).build();
            match self.docker.remove_image(image, Some(options), None).await {
                Ok(_)
                | Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => eprintln!("cannot remove image {image}: {e}"),
            }
        });
    }
}

impl Drop for DockerTest {
    fn drop(&mut self) {
        // `<prefix>-`: a test whose pid extends this one's (123 and 1234) keeps its containers.
        for name in self.containers_named(&format!("{}-", self.prefix)) {
            self.remove_container(&name);
        }
        let images = std::mem::take(&mut *self.images.lock().unwrap_or_else(|e| e.into_inner()));
        for image in images.iter().rev() {
            self.remove_image(image);
        }
    }
}

fn no_engine(error: &str) -> String {
    format!(
        "no Docker Engine answers on unix://{DOCKER_SOCKET} ({error}): the container tests need one; start dockerd \
         (scripts/test.sh installs Debian's docker.io and starts it when it is missing)"
    )
}

/// A build context (uncompressed tar): `Dockerfile` (`FROM scratch`, `COPY rootfs/ /`, the entrypoint) and
/// `rootfs/` with the files and the shared libraries they load.
fn build_context(files: &[(&Path, Option<&str>)], entrypoint: &[&str]) -> Vec<u8> {
    let mut rootfs: Vec<(PathBuf, String)> = Vec::new();
    let mut add = |host: PathBuf, inside: String| {
        if !rootfs.iter().any(|(_, known)| *known == inside) {
            rootfs.push((host, inside));
        }
    };
    for (host, inside) in files {
        let inside = inside.map(str::to_string).unwrap_or_else(|| {
            format!(
                "/{}",
                host.file_name()
                    .unwrap_or_else(|| panic!("{} has no file name", host.display()))
                    .to_string_lossy()
            )
        });
        add(host.to_path_buf(), inside);
        for library in shared_libraries(host) {
            let inside = library.to_string_lossy().into_owned();
            add(library, inside);
        }
    }
    let entrypoint = serde_json::to_string(entrypoint).unwrap_or_else(|e| panic!("{e}"));
    let dockerfile = format!("FROM scratch\nCOPY rootfs/ /\nENTRYPOINT {entrypoint}\n");
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(true);
    // Linker output has holes; GNU sparse entries (type `S`) are refused by the engine's tar reader.
    tar.sparse(false);
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write the build context: {e}"));
    for (host, inside) in &rootfs {
        let inside = format!("rootfs/{}", inside.trim_start_matches('/'));
        tar.append_path_with_name(host, &inside)
            .unwrap_or_else(|e| panic!("cannot add {} to the build context: {e}", host.display()));
    }
    tar.into_inner()
        .unwrap_or_else(|e| panic!("cannot finish the build context: {e}"))
}

/// The shared libraries (and the loader) `ldd` lists for `binary`; none for a static binary.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let output = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd (install libc-bin): {e}"));
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}
