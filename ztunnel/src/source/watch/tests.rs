use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::*;

const DEADLINE: Duration = Duration::from_secs(10);

fn mesh(ip: &str) -> String {
    format!("workloads:\n- {{name: echo, namespace: default, workloadIps: [\"{ip}\"]}}\n")
}

/// A fresh directory under the system temp dir, removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ztunnel-watch-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Replaces `name` atomically (write then rename), as editors and ConfigMaps do.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        let path = self.0.join(name);
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until the published state has a workload at `ip`.
async fn wait_for_ip(rx: &mut watch::Receiver<Arc<State>>, ip: &str) {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    tokio::time::timeout(DEADLINE, rx.wait_for(|s| s.workload_by_ip(ip).is_some()))
        .await
        .unwrap_or_else(|_| panic!("no state with {ip} before the deadline"))
        .unwrap();
}

#[tokio::test]
async fn applies_changes_and_keeps_the_last_good_state() {
    let dir = TempDir::new("apply");
    let path = dir.write("mesh.yaml", &mesh("10.0.0.1"));
    let (tx, mut rx) = watch::channel(Arc::new(State::default()));
    let (err_tx, mut err_rx) = mpsc::unbounded_channel();
    let w = spawn_file_watch_every(
        path.clone(),
        tx,
        move |e| {
            let _ = err_tx.send(e.to_string());
        },
        Duration::from_millis(20),
    );
    let stats = w.stats();

    wait_for_ip(&mut rx, "10.0.0.1").await;
    assert_eq!(stats.applied(), 1);

    // A broken edit: reported once, with the file and field, and the old state stays.
    dir.write("mesh.yaml", &mesh("10.0.0.x"));
    let msg = tokio::time::timeout(DEADLINE, err_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        msg.starts_with(&format!(
            "{}: workloads[0] (name \"echo\"): workloadIps[0]",
            path.display()
        )),
        "{msg}"
    );
    assert_eq!(stats.rejected(), 1);
    assert!(
        rx.borrow()
            .workload_by_ip("10.0.0.1".parse().unwrap())
            .is_some()
    );

    // The fix is applied.
    dir.write("mesh.yaml", &mesh("10.0.0.2"));
    wait_for_ip(&mut rx, "10.0.0.2").await;
    assert!(
        rx.borrow()
            .workload_by_ip("10.0.0.1".parse().unwrap())
            .is_none()
    );
    assert_eq!(stats.applied(), 2);
    assert_eq!(stats.rejected(), 1);
    assert!(
        err_rx.try_recv().is_err(),
        "the bad content was reported more than once"
    );
}

#[tokio::test]
async fn a_missing_file_is_an_error_and_its_return_is_applied() {
    let dir = TempDir::new("missing");
    let path = dir.0.join("mesh.yaml");
    let (tx, mut rx) = watch::channel(Arc::new(State::default()));
    let (err_tx, mut err_rx) = mpsc::unbounded_channel();
    let w = spawn_file_watch_every(
        path.clone(),
        tx,
        move |e| {
            let _ = err_tx.send(e.to_string());
        },
        Duration::from_millis(20),
    );
    let msg = tokio::time::timeout(DEADLINE, err_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(msg.contains("cannot read"), "{msg}");
    dir.write("mesh.yaml", &mesh("10.0.0.3"));
    wait_for_ip(&mut rx, "10.0.0.3").await;
    assert_eq!(
        w.stats().rejected(),
        1,
        "a persisting read error is reported once"
    );
}
