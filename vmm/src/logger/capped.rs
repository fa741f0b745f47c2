//! A writer that stops at a size cap: once the next write would take it
//! past the cap, it writes one note saying so and drops everything after
//! it (reporting it written, so callers carry on). The VMM cannot rotate
//! its log: its stderr is a file the runtime opened, and once jailed it
//! sees no host path to rename.

use std::io::{self, Write};

/// The most the VMM writes to its log (`vmm.log`, its stderr) through
/// `tracing`. A few lines the VMM prints on its way out (why it stopped,
/// the counts of suppressed lines) come after the cap, each once.
pub const MAX_LOG_BYTES: u64 = 4 << 20;
/// The most the VMM writes to a console file for the guest.
pub const MAX_CONSOLE_BYTES: u64 = 16 << 20;

pub struct Capped<W: Write> {
    inner: W,
    cap: u64,
    written: u64,
    what: &'static str,
    full: bool,
    dropped: u64,
}

impl<W: Write> Capped<W> {
    /// `what` names the output in the note ("vmm.log", "the console").
    pub fn new(inner: W, cap: u64, what: &'static str) -> Self {
        Self {
            inner,
            cap,
            written: 0,
            what,
            full: false,
            dropped: 0,
        }
    }

    /// Bytes written so far, the note included.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes dropped since the cap was reached.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.full {
            self.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        if self.written + buf.len() as u64 > self.cap {
            self.full = true;
            self.dropped += buf.len() as u64;
            let note = format!(
                "\nmicrovm-vmm: {} reached its cap of {} bytes: what follows is dropped\n",
                self.what, self.cap
            );
            // Best effort: the note is all that is left to say.
            if self.inner.write_all(note.as_bytes()).is_ok() {
                self.written += note.len() as u64;
            }
            let _ = self.inner.flush();
            return Ok(buf.len());
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_the_cap_and_says_so_once() {
        let mut out = Capped::new(Vec::new(), 100, "vmm.log");
        for _ in 0..1000 {
            writeln!(out, "a line of some length").unwrap();
        }
        let text = String::from_utf8(out.inner.clone()).unwrap();
        let note_len = text.lines().last().unwrap().len() + 2;
        assert!(text.len() <= 100 + note_len, "{} bytes", text.len());
        assert_eq!(text.matches("reached its cap of 100 bytes").count(), 1);
        // Whole lines only before the note: no line was cut.
        let before = text.split("\nmicrovm-vmm:").next().unwrap();
        assert!(before.lines().all(|line| line == "a line of some length"));
        assert!(out.dropped() > 0);
        assert_eq!(out.written() as usize, text.len());
    }

    #[test]
    fn under_the_cap_everything_goes_through() {
        let mut out = Capped::new(Vec::new(), 1 << 20, "the console");
        out.write_all(b"hello\n").unwrap();
        assert_eq!(out.inner, b"hello\n");
        assert_eq!(out.dropped(), 0);
    }
}
