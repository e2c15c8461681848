//! Watching the local config file: poll it, and when its content changes, validate it and
//! publish the new `State`. An invalid file is reported (log, counter, callback) and the last
//! good state stays in force: a typo while editing must not take the mesh down.
//!
//! Polling the content (not inotify) is deliberate: it works the same for editors that
//! rewrite in place, editors that rename over the file, and ConfigMap symlink swaps, and a
//! config file is small.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::local::{self, LocalConfigError};
use crate::state::State;

/// How often the file is looked at by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Counters about a source, for metrics and tests.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// New states published.
    pub applied: AtomicU64,
    /// Changed file contents (or new read failures) that were rejected.
    pub rejected: AtomicU64,
}

impl SourceStats {
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

/// A running watch; dropping it stops the watch.
#[derive(Debug)]
pub struct FileWatch {
    stats: Arc<SourceStats>,
    task: JoinHandle<()>,
}

impl FileWatch {
    pub fn stats(&self) -> Arc<SourceStats> {
        self.stats.clone()
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What was last seen at the path, so each change is handled (and each failure reported) once.
#[derive(PartialEq, Eq)]
enum Seen {
    Content(u64),
    ReadError(String),
}

/// Watches `path` every [`DEFAULT_POLL_INTERVAL`]. The first look publishes the file's state
/// if it is valid (a caller that loaded it already sees one redundant update). Stops when
/// every receiver of `tx` is gone or the returned handle is dropped. Must be called inside a
/// tokio runtime.
pub fn spawn_file_watch<F>(path: PathBuf, tx: watch::Sender<Arc<State>>, on_error: F) -> FileWatch
where
    F: Fn(&LocalConfigError) + Send + Sync + 'static,
{
    spawn_file_watch_every(path, tx, on_error, DEFAULT_POLL_INTERVAL)
}

/// [`spawn_file_watch`] with another polling interval.
pub fn spawn_file_watch_every<F>(
    path: PathBuf,
    tx: watch::Sender<Arc<State>>,
    on_error: F,
    every: Duration,
) -> FileWatch
where
    F: Fn(&LocalConfigError) + Send + Sync + 'static,
{
    let stats = Arc::new(SourceStats::default());
    let task = tokio::spawn(run(path, tx, on_error, every, stats.clone()));
    FileWatch { stats, task }
}

async fn run<F>(
    path: PathBuf,
    tx: watch::Sender<Arc<State>>,
    on_error: F,
    every: Duration,
    stats: Arc<SourceStats>,
) where
    F: Fn(&LocalConfigError) + Send + Sync + 'static,
{
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Seen> = None;
    loop {
        ticks.tick().await;
        if tx.is_closed() {
            return;
        }
        let (seen, bytes) = read(&path).await;
        if last.as_ref() == Some(&seen) {
            continue;
        }
        last = Some(seen);
        let result = match bytes {
            Ok(bytes) => validate(&path, bytes).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(state) => {
                tracing::info!(
                    file = %path.display(),
                    workloads = state.workloads().count(),
                    services = state.services().count(),
                    policies = state.policies().count(),
                    "local config applied"
                );
                // Counted first, so whoever sees the new state also sees the count.
                stats.applied.fetch_add(1, Ordering::Relaxed);
                tx.send_replace(Arc::new(state));
            }
            Err(e) => {
                tracing::warn!("local config rejected, keeping the last good state: {e}");
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                on_error(&e);
            }
        }
    }
}

/// Reads the file; what was seen is its content hash, or the read error.
async fn read(path: &Path) -> (Seen, Result<Vec<u8>, LocalConfigError>) {
    match read_capped(path).await {
        Ok(bytes) => {
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            (Seen::Content(h.finish()), Ok(bytes))
        }
        Err(e) => (Seen::ReadError(e.to_string()), Err(e)),
    }
}

/// Validates off the async threads: a big file takes a while.
async fn validate(path: &Path, bytes: Vec<u8>) -> Result<State, LocalConfigError> {
    let file = path.display().to_string();
    let name = file.clone();
    let parsed = tokio::task::spawn_blocking(move || match String::from_utf8(bytes) {
        Ok(text) => local::parse(&name, &text),
        Err(_) => Err(LocalConfigError::Syntax {
            file: name,
            location: None,
            message: "the file is not UTF-8 text".to_owned(),
        }),
    })
    .await;
    parsed.unwrap_or_else(|join| {
        Err(LocalConfigError::Syntax {
            file,
            location: None,
            message: format!("validation did not finish: {join}"),
        })
    })
}

async fn read_capped(path: &Path) -> Result<Vec<u8>, LocalConfigError> {
    let file = path.display().to_string();
    let read_err = |source| LocalConfigError::Read {
        file: file.clone(),
        source,
    };
    let size = tokio::fs::metadata(path).await.map_err(read_err)?.len();
    if size > local::MAX_FILE_BYTES {
        return Err(LocalConfigError::TooLarge { file, size });
    }
    tokio::fs::read(path).await.map_err(read_err)
}

#[cfg(test)]
mod tests;
