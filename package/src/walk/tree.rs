//! The package's tree, one node per path component (index 0 is the archive root): it refuses duplicate paths,
//! entries below a file or symlink, over-deep paths and symlinks that resolve through other symlinks. Memory grows
//! with the number of components, never with the square of the path lengths.

use crate::PackageError;
use crate::manifest::SymlinkEntry;
use crate::paths::resolve_symlink;
use std::collections::HashMap;

/// What a path in the archive is, as far as later entries are concerned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Node {
    ImpliedDir,
    Dir,
    File,
    Symlink,
}

/// One path component of the package tree.
struct TreeNode {
    kind: Node,
    children: HashMap<String, usize>,
}

/// Index of the archive root in the tree.
const ROOT: usize = 0;
/// Deepest path accepted, in components: real packages stay far below; deeper ones only cost memory.
pub(crate) const MAX_DEPTH: usize = 128;

/// Every path of the package seen so far.
pub(super) struct PackageTree {
    nodes: Vec<TreeNode>,
}

impl PackageTree {
    /// A tree holding only the archive root.
    pub(super) fn new() -> Self {
        Self {
            nodes: vec![TreeNode {
                kind: Node::Dir,
                children: HashMap::new(),
            }],
        }
    }

    /// Records where `path` sits in the tree; refuses duplicates and entries below a file or a symlink.
    pub(super) fn place(&mut self, path: &str, node: Node) -> Result<(), PackageError> {
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() > MAX_DEPTH {
            return Err(PackageError::PathTooDeep {
                entry: path.to_owned(),
                depth: parts.len(),
                limit: MAX_DEPTH,
            });
        }
        let mut at = ROOT;
        for (i, part) in parts.iter().enumerate() {
            let existing = self.nodes[at].children.get(*part).copied();
            let is_last = i + 1 == parts.len();
            match (existing, is_last) {
                (Some(child), false) => match self.nodes[child].kind {
                    Node::File | Node::Symlink => {
                        let ancestor_kind = if self.nodes[child].kind == Node::File {
                            "file"
                        } else {
                            "symlink"
                        };
                        return Err(PackageError::ThroughNonDirectory {
                            entry: path.to_owned(),
                            ancestor: parts[..=i].join("/"),
                            ancestor_kind,
                        });
                    }
                    Node::Dir | Node::ImpliedDir => at = child,
                },
                (None, false) => at = self.add_node(at, part, Node::ImpliedDir),
                (Some(child), true)
                    if self.nodes[child].kind == Node::ImpliedDir && node == Node::Dir =>
                {
                    self.nodes[child].kind = Node::Dir;
                }
                (Some(_), true) => {
                    return Err(PackageError::DuplicatePath {
                        entry: path.to_owned(),
                    });
                }
                (None, true) => {
                    self.add_node(at, part, node);
                }
            }
        }
        Ok(())
    }

    fn add_node(&mut self, parent: usize, name: &str, kind: Node) -> usize {
        let index = self.nodes.len();
        self.nodes.push(TreeNode {
            kind,
            children: HashMap::new(),
        });
        self.nodes[parent].children.insert(name.to_owned(), index);
        index
    }

    /// A symlink whose target walks through another symlink of the package could escape after a `..`, whatever
    /// the lexical check says: refused. Walks the package tree along each target, so the cost stays linear.
    pub(super) fn check_symlink_chains(
        &self,
        symlinks: &[SymlinkEntry],
    ) -> Result<(), PackageError> {
        for link in symlinks {
            // Where each step of the walk stands in the package tree (`None`: outside what the package holds).
            let mut stack: Vec<Option<usize>> = vec![Some(ROOT)];
            let link_parts: Vec<&str> = link.path.split('/').collect();
            for part in &link_parts[..link_parts.len() - 1] {
                let here = stack.last().copied().flatten();
                stack.push(here.and_then(|n| self.nodes[n].children.get(*part).copied()));
            }
            let steps: Vec<&str> = link
                .target
                .split('/')
                .filter(|p| !p.is_empty() && *p != ".")
                .collect();
            for (i, step) in steps.iter().enumerate() {
                if *step == ".." {
                    stack.pop();
                    if stack.is_empty() {
                        break; // above the root: the lexical check already refused it
                    }
                    continue;
                }
                let here = stack.last().copied().flatten();
                let next = here.and_then(|n| self.nodes[n].children.get(*step).copied());
                if let Some(child) = next
                    && self.nodes[child].kind == Node::Symlink
                    && i + 1 < steps.len()
                {
                    let via =
                        resolve_symlink(&link.path, &steps[..=i].join("/")).unwrap_or_default();
                    return Err(PackageError::SymlinkThroughSymlink {
                        entry: link.path.clone(),
                        target: link.target.clone(),
                        via,
                    });
                }
                stack.push(next);
            }
        }
        Ok(())
    }
}
