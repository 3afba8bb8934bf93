//! Entry path rules: relative, no `..`, no control characters, no invisible Unicode format characters, in Unicode
//! NFC, normalised to `a/b/c` (no `./`, no trailing `/`).

use unicode_normalization::{IsNormalized, is_nfc_quick};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Why a raw entry path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathProblem {
    Absolute,
    Parent,
    Control,
    /// Nothing left after normalising (`./`, `.`): the archive root itself.
    Root,
    /// Longer than the kernel's PATH_MAX: it could not be created, and deep paths would cost quadratic memory.
    TooLong,
    /// An invisible Unicode format character (bidi override U+202E, zero-width space…) or line/paragraph separator:
    /// the name would display as something it is not.
    FormatCharacter(char),
    /// Not in Unicode NFC: a look-alike of another spelling of the same name.
    NotNfc,
}

/// The first character of `text` that displays as something else or nothing: Unicode format characters (`Cf`:
/// bidi controls, zero-width characters, BOM…) and line/paragraph separators.
pub(crate) fn first_format_character(text: &str) -> Option<char> {
    text.chars().find(|c| {
        matches!(
            c.general_category(),
            GeneralCategory::Format
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
        )
    })
}

/// The Unicode rule `text` (a path or link target) breaks, if any: a format character, or a spelling not in NFC.
pub(crate) fn unicode_problem(text: &str) -> Option<PathProblem> {
    if let Some(found) = first_format_character(text) {
        Some(PathProblem::FormatCharacter(found))
    } else if !is_nfc(text) {
        Some(PathProblem::NotNfc)
    } else {
        None
    }
}

/// The error of a path or link target that breaks a Unicode rule ([`PathProblem::FormatCharacter`], `NotNfc`).
pub(crate) fn unicode_error(entry: String, problem: PathProblem) -> crate::PackageError {
    use unicode_normalization::UnicodeNormalization;
    let detail = match problem {
        PathProblem::FormatCharacter(found) => format!(
            "it holds the invisible Unicode format character U+{:04X}, which makes a name display as \
             something it is not",
            u32::from(found)
        ),
        _ => format!(
            "it is not in Unicode normalization form C (NFC), so it looks like `{}` but is spelled differently",
            entry.nfc().collect::<String>()
        ),
    };
    crate::PackageError::UnsafeUnicode { entry, detail }
}

/// True when `text` is in Unicode Normalization Form C (what macOS and most editors do not guarantee).
pub(crate) fn is_nfc(text: &str) -> bool {
    match is_nfc_quick(text.chars()) {
        IsNormalized::Yes => true,
        IsNormalized::No => false,
        IsNormalized::Maybe => unicode_normalization::is_nfc(text),
    }
}

/// Longest entry path or link target accepted, in bytes (Linux `PATH_MAX` less the terminating NUL).
pub(crate) const MAX_PATH_BYTES: usize = 4095;

/// Normalises a tar entry path: drops `.` components, empty components and trailing slashes.
pub(crate) fn normalize_entry_path(raw: &str) -> Result<String, PathProblem> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(PathProblem::TooLong);
    }
    if raw.starts_with('/') {
        return Err(PathProblem::Absolute);
    }
    if raw.chars().any(char::is_control) {
        return Err(PathProblem::Control);
    }
    if let Some(problem) = unicode_problem(raw) {
        return Err(problem);
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(PathProblem::Parent),
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        return Err(PathProblem::Root);
    }
    Ok(parts.join("/"))
}

/// The first component of a normalised path.
pub(crate) fn top_component(path: &str) -> &str {
    path.split('/').next().unwrap_or(path)
}

/// The proper ancestors of a normalised path, shortest first (`a/b/c` → `a`, `a/b`).
pub(crate) fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// Resolves a symlink target lexically from the link's directory; `None` when it climbs above the archive root.
pub(crate) fn resolve_symlink(link_path: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = link_path.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    Some(parts.join("/"))
}

/// True when `path` is `dir` or lies below it.
pub(crate) fn is_within(path: &str, dir: &str) -> bool {
    path == dir
        || (path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/')
}

/// Paths of `candidates` that look like `wanted` (same file name, or one name contains the other), at most 5.
pub(crate) fn similar_paths<'a>(
    wanted: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    let wanted_name = wanted.rsplit('/').next().unwrap_or(wanted);
    let mut found: Vec<String> = candidates
        .filter(|candidate| {
            let name = candidate.rsplit('/').next().unwrap_or(candidate);
            !wanted_name.is_empty() && (name.contains(wanted_name) || wanted_name.contains(name))
        })
        .map(str::to_owned)
        .collect();
    found.sort();
    found.truncate(5);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        assert_eq!(normalize_entry_path("./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(normalize_entry_path("a/"), Ok("a".to_owned()));
        assert_eq!(
            normalize_entry_path("/etc/passwd"),
            Err(PathProblem::Absolute)
        );
        assert_eq!(normalize_entry_path("a/../../b"), Err(PathProblem::Parent));
        assert_eq!(normalize_entry_path("a/b\nc"), Err(PathProblem::Control));
        assert_eq!(normalize_entry_path("./"), Err(PathProblem::Root));
        assert_eq!(
            normalize_entry_path("c/evil\u{202e}fdp.exe"),
            Err(PathProblem::FormatCharacter('\u{202e}'))
        );
        assert_eq!(
            normalize_entry_path("c/bin\u{200b}/x"),
            Err(PathProblem::FormatCharacter('\u{200b}'))
        );
        // `é` as e + combining acute (NFD) is refused; the precomposed NFC spelling is fine.
        assert_eq!(
            normalize_entry_path("c/cafe\u{301}"),
            Err(PathProblem::NotNfc)
        );
        assert_eq!(normalize_entry_path("c/caf\u{e9}").unwrap(), "c/caf\u{e9}");
        assert_eq!(normalize_entry_path("c/日本語").unwrap(), "c/日本語");
        assert_eq!(
            normalize_entry_path(&"a/".repeat(3000)),
            Err(PathProblem::TooLong)
        );
    }

    #[test]
    fn symlink_resolution() {
        assert_eq!(
            resolve_symlink("c/bin/x", "../lib/y").as_deref(),
            Some("c/lib/y")
        );
        assert_eq!(resolve_symlink("c/x", "..").as_deref(), Some(""));
        assert_eq!(resolve_symlink("c/x", "../.."), None);
        assert!(is_within("c/lib/y", "c"));
        assert!(is_within("c", "c"));
        assert!(!is_within("cc/x", "c"));
        assert!(!is_within("", "c"));
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), vec!["a", "a/b"]);
    }

    #[test]
    fn similar() {
        let all = ["w/bin/worker", "w/conf/worker.toml", "w/other"];
        assert_eq!(
            similar_paths("w/worker", all.into_iter()),
            vec!["w/bin/worker", "w/conf/worker.toml"]
        );
    }
}
