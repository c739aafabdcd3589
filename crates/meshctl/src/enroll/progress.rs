//! enroll's and unenroll's numbered progress lines on stdout: `[3/9] checking privileges ... ok
//! (root)`, with notes under a step.

use std::fmt::Display;
use std::io::Write;

/// Prints a line on stdout (a closed stdout is not worth failing for).
pub fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Numbered progress lines: `[3/9] checking privileges ... ok (root)`, on stdout (tests give
/// it a buffer).
pub struct Progress<W: Write = std::io::Stdout> {
    step: usize,
    total: usize,
    /// Whether the current step's line waits for its outcome.
    open: bool,
    /// Where the lines go; flushed after every write, so a step's line shows while it runs.
    out: W,
}

impl Progress {
    /// Progress of `total` steps on stdout.
    pub fn new(total: usize) -> Self {
        Self::to(total, std::io::stdout())
    }
}

impl<W: Write> Progress<W> {
    /// Progress of `total` steps written to `out`.
    pub fn to(total: usize, out: W) -> Self {
        Self { step: 0, total, open: false, out }
    }

    fn write(&mut self, text: &str) {
        let _ = write!(self.out, "{text}");
        let _ = self.out.flush();
    }

    /// Skips to just before the last step (the ones between were not reached).
    pub fn last(&mut self) {
        self.step = self.total - 1;
    }

    /// Begins the next step's line.
    pub fn start(&mut self, what: impl Display) {
        self.step += 1;
        let line = format!("[{}/{}] {what} ... ", self.step, self.total);
        self.write(&line);
        self.open = true;
    }

    /// Ends the current line (for a step that prints notes).
    pub fn newline(&mut self) {
        if self.open {
            self.write("\n");
            self.open = false;
        }
    }

    /// A line under the current step.
    pub fn note(&mut self, text: &str) {
        self.newline();
        self.write(&format!("      {text}\n"));
    }

    fn finish(&mut self, word: &str, detail: &str) {
        let text = if detail.is_empty() { word.to_owned() } else { format!("{word} ({detail})") };
        if self.open {
            self.write(&format!("{text}\n"));
        } else {
            self.write(&format!("      {text}\n"));
        }
        self.open = false;
    }

    /// Ends the current step with `ok (detail)`.
    pub fn ok(&mut self, detail: impl Display) {
        self.finish("ok", &detail.to_string());
    }

    /// Ends the current step with `skipped (why)`.
    pub fn skip(&mut self, why: &str) {
        self.finish("skipped", why);
    }

    /// Ends the current step with `failed` (the error follows on stderr).
    pub fn fail(&mut self) {
        self.finish("failed", "");
    }

    /// Awaits a step; prints `ok (detail)` or `failed`.
    pub async fn run<T>(&mut self, step: impl Future<Output = anyhow::Result<(T, String)>>) -> anyhow::Result<T> {
        match step.await {
            Ok((value, detail)) => {
                self.ok(detail);
                Ok(value)
            }
            Err(err) => {
                self.fail();
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;

    use super::*;

    fn text(progress: Progress<Vec<u8>>) -> String {
        String::from_utf8(progress.out).unwrap()
    }

    #[tokio::test]
    async fn steps_read_as_numbered_lines() {
        let mut progress = Progress::to(3, Vec::new());
        progress.start("checking privileges");
        assert_eq!(progress.run(async { Ok((7, "root".to_owned())) }).await.unwrap(), 7);
        progress.start(format!("waiting for {}", "edge-1"));
        progress.newline();
        progress.note("the agent published its key");
        progress.ok("joined after 1.0 s");
        progress.last();
        progress.start("deleting");
        assert!(progress.run(async { Err::<((), String), _>(anyhow!("no")) }).await.is_err());
        assert_eq!(
            text(progress),
            "[1/3] checking privileges ... ok (root)\n\
             [2/3] waiting for edge-1 ... \n      the agent published its key\n      ok (joined after 1.0 s)\n\
             [3/3] deleting ... failed\n"
        );
    }

    #[test]
    fn a_skipped_step_and_a_note_on_an_open_line() {
        let mut progress = Progress::to(9, Vec::new());
        progress.start("checking the name");
        progress.ok("");
        progress.note("note: a loopback API server");
        progress.start("waiting");
        progress.skip("--no-wait");
        assert_eq!(
            text(progress),
            "[1/9] checking the name ... ok\n      note: a loopback API server\n[2/9] waiting ... skipped (--no-wait)\n"
        );
    }
}
