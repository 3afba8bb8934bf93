//! Confinement (ARCHITECTURE.md invariant 2): the engine writes only under `state_dir` and the deploy roots.
//! Paths are checked lexically (absolute, no `..`) and again with symlinks resolved on the deepest existing
//! ancestor, so a symlinked directory inside a deploy dir cannot redirect a write elsewhere; the writes themselves
//! then go through a handle on the deploy dir ([`Confinement::open_deploy_dir`]) that the kernel keeps them below.

use crate::fsutil::{DirHandle, FsError};
use std::path::{Component, Path, PathBuf};

/// A path the engine was asked to write lies outside where it may write.
#[derive(Debug, thiserror::Error)]
#[error(
    "refused: {} lies outside {allowed}; the agent writes only under its deploy roots ({roots}); fix the service's deploy_dir or the package path",
    path.display()
)]
pub struct ConfinementError {
    pub path: PathBuf,
    pub allowed: String,
    pub roots: String,
}

/// The deploy roots, lexically and with symlinks resolved.
#[derive(Debug, Clone)]
pub struct Confinement {
    roots: Vec<PathBuf>,
}

impl Confinement {
    pub fn new(roots: &[PathBuf]) -> Self {
        Confinement {
            roots: roots.to_vec(),
        }
    }

    fn roots_text(&self) -> String {
        if self.roots.is_empty() {
            return "none configured".into();
        }
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn refuse(&self, path: &Path, allowed: impl Into<String>) -> ConfinementError {
        ConfinementError {
            path: path.to_path_buf(),
            allowed: allowed.into(),
            roots: self.roots_text(),
        }
    }

    /// A service's deploy dir must lie strictly under one deploy root, also after resolving symlinks.
    pub fn check_deploy_dir(&self, deploy_dir: &Path) -> Result<(), ConfinementError> {
        if !is_clean_absolute(deploy_dir) {
            return Err(self.refuse(
                deploy_dir,
                "the deploy roots (it is not a clean absolute path)",
            ));
        }
        let lexical = self
            .roots
            .iter()
            .any(|root| deploy_dir.starts_with(root) && deploy_dir != root);
        if !lexical {
            return Err(self.refuse(deploy_dir, "every deploy root"));
        }
        let resolved = resolve_existing_prefix(deploy_dir);
        let inside = self.roots.iter().any(|root| {
            let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
            resolved.starts_with(&root) && resolved != root
        });
        if inside {
            Ok(())
        } else {
            Err(self.refuse(deploy_dir, "every deploy root once symlinks are resolved"))
        }
    }

    /// A file the engine writes in a deploy dir: a clean path under `deploy_dir`, whose existing ancestors
    /// resolve inside `deploy_dir` (and so inside a deploy root).
    pub fn check_target(&self, deploy_dir: &Path, target: &Path) -> Result<(), ConfinementError> {
        self.check_deploy_dir(deploy_dir)?;
        let allowed = format!("the service's deploy_dir {}", deploy_dir.display());
        if !is_clean_absolute(target) || !target.starts_with(deploy_dir) || target == deploy_dir {
            return Err(self.refuse(target, allowed));
        }
        let Some(parent) = target.parent() else {
            return Err(self.refuse(target, allowed));
        };
        let resolved_parent = resolve_existing_prefix(parent);
        let resolved_deploy = resolve_existing_prefix(deploy_dir);
        if resolved_parent.starts_with(&resolved_deploy) {
            Ok(())
        } else {
            Err(self.refuse(target, allowed))
        }
    }
}

impl Confinement {
    /// Opens a service's deploy dir as a directory handle for the file work of an apply: checked as
    /// [`Confinement::check_deploy_dir`] does, then reached from its deploy root (opened as configured) with no
    /// symlink and no `..` on the way, so a deploy dir swapped for a symlink since the check is refused.
    pub fn open_deploy_dir(&self, deploy_dir: &Path) -> Result<DirHandle, FsError> {
        let (root, rel) = self.root_of(deploy_dir)?;
        root.open_dir(rel)
    }

    /// Creates a service's deploy dir that does not exist yet (its parent must), through its deploy root's
    /// handle as [`DirHandle::create_dir`] does; an existing directory is fine.
    pub fn create_deploy_dir(&self, deploy_dir: &Path) -> Result<(), FsError> {
        let (root, rel) = self.root_of(deploy_dir)?;
        root.create_dir(rel).map(|_| ())
    }

    /// Removes a service's deploy dir if it is empty (an apply created it and is undone); best effort.
    pub fn remove_deploy_dir_if_empty(&self, deploy_dir: &Path) {
        if let Ok((root, rel)) = self.root_of(deploy_dir) {
            root.remove_empty_dir(rel);
        }
    }

    /// The deploy root holding `deploy_dir` (opened as configured) and the path from it to `deploy_dir`, once
    /// `deploy_dir` passed [`Confinement::check_deploy_dir`].
    fn root_of<'p>(&self, deploy_dir: &'p Path) -> Result<(DirHandle, &'p Path), FsError> {
        let refused = |detail: String| FsError {
            op: "open deploy dir",
            path: deploy_dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, detail),
        };
        self.check_deploy_dir(deploy_dir)
            .map_err(|e| refused(e.to_string()))?;
        let Some((root, rel)) = self
            .roots
            .iter()
            .filter_map(|root| Some((root, deploy_dir.strip_prefix(root).ok()?)))
            .filter(|(_, rel)| is_clean_relative(rel))
            .max_by_key(|(root, _)| root.as_os_str().len())
        else {
            return Err(refused(
                self.refuse(deploy_dir, "every deploy root").to_string(),
            ));
        };
        Ok((DirHandle::open_trusted(root)?, rel))
    }
}

/// Absolute and made only of normal components.
pub fn is_clean_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// A relative path made only of normal components (no `..`, `.`, root).
pub fn is_clean_relative(path: &Path) -> bool {
    !path.as_os_str().is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Canonicalizes the deepest existing ancestor of `path` and appends the rest unchanged.
fn resolve_existing_prefix(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(canonical) = std::fs::canonicalize(&existing) {
            let mut out = canonical;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent().map(Path::to_path_buf),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_dirs_outside_roots_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let confine = Confinement::new(&[root.path().to_path_buf()]);
        assert!(confine.check_deploy_dir(&root.path().join("svc")).is_ok());
        assert!(confine.check_deploy_dir(root.path()).is_err());
        assert!(confine.check_deploy_dir(outside.path()).is_err());
        assert!(
            confine
                .check_deploy_dir(&root.path().join("svc/../../etc"))
                .is_err()
        );
        // a symlink inside the root that points outside does not count as inside
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        let err = confine
            .check_deploy_dir(&root.path().join("escape/svc"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("deploy roots"), "{err}");
    }

    #[test]
    fn targets_must_stay_in_the_deploy_dir() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let deploy = root.path().join("svc");
        std::fs::create_dir_all(deploy.join("bin")).unwrap();
        let confine = Confinement::new(&[root.path().to_path_buf()]);
        assert!(
            confine
                .check_target(&deploy, &deploy.join("bin/new/x"))
                .is_ok()
        );
        assert!(
            confine
                .check_target(&deploy, &root.path().join("other/x"))
                .is_err()
        );
        std::os::unix::fs::symlink(outside.path(), deploy.join("bin/link")).unwrap();
        assert!(
            confine
                .check_target(&deploy, &deploy.join("bin/link/x"))
                .is_err()
        );
    }
}
