//! Lines of keys in the runbook's source, for problems serde cannot locate (semantic checks). Built from
//! `saphyr-parser`'s events, which carry positions: `steps[3].check.expect` → the 1-based line of that key.

use saphyr_parser::{Event, Parser};
use std::collections::HashMap;

/// Key path → 1-based line. Paths are written `a.b[2].c`.
#[derive(Debug, Default)]
pub(crate) struct LineIndex {
    lines: HashMap<String, usize>,
}

impl LineIndex {
    /// Indexes `text`; a text the parser refuses gives an empty index (serde reports that error itself).
    pub(crate) fn new(text: &str) -> Self {
        let mut events = Vec::new();
        for item in Parser::new_from_str(text) {
            match item {
                Ok((event, span)) => events.push((event, span.start.line())),
                Err(_) => return Self::default(),
            }
        }
        let mut index = Self::default();
        let mut position = 0;
        // Skip StreamStart and DocumentStart.
        while position < events.len()
            && matches!(
                events[position].0,
                Event::StreamStart | Event::DocumentStart(_)
            )
        {
            position += 1;
        }
        index.node(&events, &mut position, "");
        index
    }

    /// Line of `path`, or of its nearest indexed ancestor.
    pub(crate) fn line(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(line) = self.lines.get(path) {
                return Some(*line);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }

    fn node(&mut self, events: &[(Event<'_>, usize)], position: &mut usize, path: &str) {
        let Some((event, _)) = events.get(*position) else {
            return;
        };
        *position += 1;
        match event {
            Event::MappingStart(..) => loop {
                match events.get(*position) {
                    None => return,
                    Some((Event::MappingEnd, _)) => {
                        *position += 1;
                        return;
                    }
                    Some((Event::Scalar(key, ..), line)) => {
                        let child = if path.is_empty() {
                            key.to_string()
                        } else {
                            format!("{path}.{key}")
                        };
                        self.lines.entry(child.clone()).or_insert(*line);
                        *position += 1;
                        self.node(events, position, &child);
                    }
                    Some(_) => {
                        // A complex key: index neither it nor its value.
                        self.node(events, position, "?");
                        self.node(events, position, "?");
                    }
                }
            },
            Event::SequenceStart(..) => {
                let mut item = 0;
                loop {
                    match events.get(*position) {
                        None => return,
                        Some((Event::SequenceEnd, _)) => {
                            *position += 1;
                            return;
                        }
                        Some((_, line)) => {
                            let child = format!("{path}[{item}]");
                            self.lines.entry(child.clone()).or_insert(*line);
                            self.node(events, position, &child);
                            item += 1;
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_items() {
        let text = "a: 1\nsteps:\n  - id: x\n    check:\n      expect: {exit: 0}\n  - id: y\n";
        let index = LineIndex::new(text);
        assert_eq!(index.line("a"), Some(1));
        assert_eq!(index.line("steps[0].id"), Some(3));
        assert_eq!(index.line("steps[0].check.expect.exit"), Some(5));
        assert_eq!(index.line("steps[1]"), Some(6));
        assert_eq!(index.line("steps[1].missing"), Some(6));
        assert_eq!(index.line("nothing"), None);
    }
}
