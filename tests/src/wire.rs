//! What crosses the wire: a packet capture (tcpdump) inside a namespace for the length of a
//! test step, read back with tcpdump filters.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::Proc;

/// A running capture of every TCP packet on `interface` (`any`: all of the namespace's).
pub struct PacketCapture {
    tcpdump: Proc,
    pcap: PathBuf,
}

impl PacketCapture {
    /// Starts capturing in namespace `netns`; returns once tcpdump is listening. The capture
    /// file and tcpdump's log go to `dir`.
    pub fn start(netns: &str, interface: &str, dir: &Path, name: &str) -> io::Result<Self> {
        let pcap = dir.join(format!("{name}.pcap"));
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", interface, "--immediate-mode", "-U", "-n", "-w"])
            .arg(&pcap)
            .arg("tcp");
        let tcpdump = Proc::spawn(&format!("tcpdump-{name}"), netns, cmd, dir)?;
        tcpdump.wait_for_log("listening on", Duration::from_secs(10))?;
        Ok(PacketCapture { tcpdump, pcap })
    }

    /// Stops capturing (everything captured so far is in the file).
    pub fn stop(&mut self) -> io::Result<()> {
        self.tcpdump.terminate(Duration::from_secs(10)).map(drop)
    }

    /// The packets captured that match the tcpdump `filter`, one line each.
    pub fn packets(&self, filter: &str) -> io::Result<Vec<String>> {
        let out = Command::new("tcpdump")
            .arg("-r")
            .arg(&self.pcap)
            .args(["-nn", filter])
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "tcpdump -r {} {filter:?}: {}",
                self.pcap.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}
