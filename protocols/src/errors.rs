//! How the workspace's errors are rendered.
//!
//! The convention: an error's `Display` says what went wrong at its level
//! and names what it was about (a path, a value), and its cause is only its
//! [`source`](std::error::Error::source) (thiserror: a field named `source`,
//! or marked `#[source]` or `#[from]`), never also interpolated into the
//! message. Whoever shows the error walks the chain once:
//!
//! - binaries print with anyhow's `{:#}`;
//! - everything that turns an error into a `String` (a ttrpc status, an
//!   error variant holding a message, a log line, a JSON answer) uses
//!   [`error_chain`], since plain `{}` / `to_string()` would drop the cause.
//!
//! An error that printed its cause in `Display` *and* returned it from
//! `source()` would show it twice; [`repeated_cause`] finds that in a
//! rendered message, for tests.

use std::error::Error;

/// `e` and each of its causes, joined with ": ", as anyhow's `{:#}` does.
///
/// A cause whose text the message so far already ends with (as its last
/// ": "-separated parts) is left out, so that an error from outside the
/// workspace that does print its cause in its `Display` still shows it once.
pub fn error_chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(current) = cause {
        let part = current.to_string();
        let shown = text == part
            || text
                .strip_suffix(part.as_str())
                .is_some_and(|before| before.ends_with(": "));
        if !part.is_empty() && !shown {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = current.source();
    }
    text
}

/// The shortest text a repeated part of a message must have to count: below
/// it, words such as "exec", "stdin" or a PID legitimately recur.
const MIN_REPEATED_LEN: usize = 8;

/// A cause that a rendered error message (a line as `{:#}` or
/// [`error_chain`] print it) shows twice, if any.
///
/// Each line is split on ": " into parts; a run of one or more consecutive
/// parts (joined back with ": ", at least 8 characters long) that occurs
/// again, aligned on the parts, later in the same line is a repeated cause:
/// `starting X: No such file or directory (os error 2): No such file or
/// directory (os error 2)` repeats `No such file or directory (os error 2)`,
/// and `a: b: c: b: c` repeats `b: c`. A name within a part is not one:
/// `preparing image /x.tar: /x.tar: not found` is not flagged, as a context
/// naming the same path as the error it wraps says nothing twice about why.
pub fn repeated_cause(message: &str) -> Option<String> {
    for line in message.lines() {
        let parts: Vec<&str> = line.split(": ").map(str::trim).collect();
        for len in (1..=parts.len() / 2).rev() {
            for start in 0..=parts.len() - 2 * len {
                let run = &parts[start..start + len];
                let text = run.join(": ");
                if text.len() < MIN_REPEATED_LEN {
                    continue;
                }
                let again = (start + len..=parts.len() - len)
                    .any(|other| &parts[other..other + len] == run);
                if again {
                    return Some(text);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    /// An error with a message and an optional cause, and whether its
    /// message also prints the cause (the mistake this module is about).
    #[derive(Debug)]
    struct Layer {
        message: &'static str,
        cause: Option<Box<Layer>>,
        prints_cause: bool,
    }

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            match (&self.cause, self.prints_cause) {
                (Some(cause), true) => write!(f, "{}: {cause}", self.message),
                _ => f.write_str(self.message),
            }
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.cause.as_deref().map(|c| c as &(dyn Error + 'static))
        }
    }

    fn layer(message: &'static str, cause: Option<Layer>, prints_cause: bool) -> Layer {
        Layer {
            message,
            cause: cause.map(Box::new),
            prints_cause,
        }
    }

    const ENOENT: &str = "No such file or directory (os error 2)";

    #[test]
    fn joins_each_cause_once() {
        let e = layer(
            "preparing image /x.tar",
            Some(layer("/x.tar", Some(layer(ENOENT, None, false)), false)),
            false,
        );
        assert_eq!(
            error_chain(&e),
            format!("preparing image /x.tar: /x.tar: {ENOENT}")
        );
        assert_eq!(error_chain(&layer(ENOENT, None, false)), ENOENT);
    }

    #[test]
    fn a_cause_already_printed_is_not_printed_again() {
        let e = layer(
            "preparing image /x.tar",
            Some(layer("/x.tar", Some(layer(ENOENT, None, false)), true)),
            true,
        );
        let text = error_chain(&e);
        assert_eq!(text, format!("preparing image /x.tar: /x.tar: {ENOENT}"));
        assert_eq!(repeated_cause(&text), None);
    }

    #[test]
    fn the_issue_example_is_a_repeated_cause() {
        let issue =
            format!("microvm: preparing image /no/such.tar: /no/such.tar: {ENOENT}: {ENOENT}");
        assert_eq!(repeated_cause(&issue).as_deref(), Some(ENOENT));
        let spawn = format!("starting the VMM /x/microvm-vmm: {ENOENT}: {ENOENT}");
        assert_eq!(repeated_cause(&spawn).as_deref(), Some(ENOENT));
    }

    #[test]
    fn a_repeated_run_of_parts_is_found() {
        assert_eq!(
            repeated_cause("a: netlink: File exists: netlink: File exists").as_deref(),
            Some("netlink: File exists")
        );
        assert_eq!(
            repeated_cause("top: one thing: two: one thing: two").as_deref(),
            Some("one thing: two")
        );
    }

    #[test]
    fn names_short_words_and_other_lines_do_not_count() {
        assert_eq!(
            repeated_cause("preparing image /x.tar: /x.tar: not found"),
            None
        );
        assert_eq!(repeated_cause("exec: a: exec: b"), None);
        assert_eq!(
            repeated_cause(&format!("first: {ENOENT}\nsecond: {ENOENT}")),
            None
        );
        assert_eq!(repeated_cause(""), None);
        assert_eq!(repeated_cause("one part only"), None);
    }
}
