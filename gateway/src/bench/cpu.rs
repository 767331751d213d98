//! The server's CPU time during a bench, read from `/proc`, so every bench
//! reports CPU per operation next to throughput and latency: on a shared,
//! noisy machine, CPU per operation and ratios of it compare runs where
//! throughput alone does not.
//!
//! The server is the process listening on the bench's port on this machine
//! (found through `/proc/net/tcp*` and the processes' open sockets), or the
//! one `--server-pid` names. A server on another machine reports nothing.

use std::time::Duration;

/// Linux reports CPU time in clock ticks of `USER_HZ`, which is 100 on every
/// architecture's user ABI.
const USER_HZ: u64 = 100;

/// The server process whose CPU time is read.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pid: Option<u32>,
}

/// CPU the server spent during the measured part of a bench.
#[derive(Debug, Clone, Copy)]
pub struct ServerCpu {
    pub pid: u32,
    /// User and system time, all threads.
    pub cpu: Duration,
    /// Wall time it was measured over.
    pub wall: Duration,
}

impl ServerCpu {
    /// CPU per operation, for `ops` operations.
    pub fn per_op(&self, ops: usize) -> Duration {
        self.cpu / ops.max(1) as u32
    }

    /// Average cores busy.
    pub fn cores(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// The line benches print.
    pub fn line(&self, ops: usize, what: &str) -> String {
        format!(
            "  server CPU   {:.3} ms per {what} ({:.2} cores busy; pid {})",
            self.per_op(ops).as_secs_f64() * 1000.0,
            self.cores(),
            self.pid
        )
    }
}

/// A sample taken at the start of the measured part.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    cpu: Option<Duration>,
    at: std::time::Instant,
}

impl Probe {
    /// The process `pid`, or the one listening on `authority`'s port here.
    pub fn new(authority: &str, pid: Option<u32>) -> Self {
        let pid = pid.or_else(|| {
            let port = authority.rsplit_once(':')?.1.parse().ok()?;
            listener_pid(port)
        });
        if pid.is_none() {
            eprintln!(
                "(the server's process was not found on this machine: no CPU figures; give --server-pid)"
            );
        }
        Self { pid }
    }

    pub fn start(&self) -> Start {
        Start {
            cpu: self.pid.and_then(cpu_time),
            at: std::time::Instant::now(),
        }
    }

    /// What the server spent since `start`.
    pub fn since(&self, start: Start) -> Option<ServerCpu> {
        let pid = self.pid?;
        let now = cpu_time(pid)?;
        Some(ServerCpu {
            pid,
            cpu: now.saturating_sub(start.cpu?),
            wall: start.at.elapsed(),
        })
    }
}

/// User plus system time of every thread of `pid` (fields 14 and 15 of
/// `/proc/PID/stat`, after the parenthesised command name).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) is index 11 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

/// The process with a socket listening on `port` (IPv4 or IPv6).
fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let listening = *state == "0A";
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if listening && local_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_found_by_its_listener_and_its_cpu_is_read() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(std::process::id()));
        let probe = Probe::new(&format!("127.0.0.1:{port}"), None);
        let start = probe.start();
        // Spin until the kernel has counted some CPU time (ticks are 10 ms).
        let mut x = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while probe.since(start).unwrap().cpu < Duration::from_millis(30) {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no CPU time was ever counted"
            );
        }
        std::hint::black_box(x);
    }
}
