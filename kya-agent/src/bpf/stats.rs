//! What the kernel side did: per-CPU counters summed, and the typed events
//! of the ring buffer turned into `tracing` records.

use kya_common::maps::{
    Counter, Event, ExeKey, KYA_EV_EXE_SELECTED, KYA_EV_MAP_UPDATE_FAILED, KYA_EV_NETNS_UNSERVED,
    KYA_EV_REFUSED_DGRAM, KYA_EV_SELECTED_CGROUP,
};
use serde::Serialize;

/// Counters of the kernel side since this instance loaded, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KernelStats {
    /// TCP connects redirected, IPv4.
    pub redirected4: u64,
    /// TCP connects redirected, IPv6.
    pub redirected6: u64,
    /// TCP connects redirected, IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
    pub redirected_v4mapped: u64,
    /// UDP (and other non-TCP) connects/sends to a guarded port refused.
    pub refused_dgram: u64,
    /// Connects skipped because the socket carries kya's `SO_MARK`.
    pub skipped_mark: u64,
    /// Connects skipped because the caller is the daemon itself.
    pub skipped_tgid: u64,
    /// Processes selected when they exec'd a selected executable.
    pub selected_exec: u64,
    /// Processes selected because a selected process forked them.
    pub selected_fork: u64,
    /// Selected processes that exited (removed from the selection).
    pub tgid_exited: u64,
    /// Map updates that failed in the kernel (map full, no memory).
    pub map_full: u64,
    /// Redirected connections established and published to the interceptor.
    pub established: u64,
    /// getpeername calls answered with the original destination.
    pub getpeername: u64,
    /// Ring buffer events dropped because the buffer was full.
    pub events_lost: u64,
    /// TCP connects of selected processes in another network namespace
    /// that kya does not serve (yet), refused (fail closed).
    pub refused_netns: u64,
    /// Processes recorded in the sticky set because they were seen with a
    /// selected uid or in a selected cgroup (they stay selected after a
    /// change of uid or cgroup).
    pub selected_sticky: u64,
    /// Processes selected when they opened a selected script named on their
    /// command line (interpreters).
    pub selected_script: u64,
    /// Events userspace read from the ring buffer.
    pub events_read: u64,
}

impl KernelStats {
    pub(super) fn set(&mut self, c: Counter, v: u64) {
        let slot = match c {
            Counter::Redirected4 => &mut self.redirected4,
            Counter::Redirected6 => &mut self.redirected6,
            Counter::RedirectedV4Mapped => &mut self.redirected_v4mapped,
            Counter::RefusedDgram => &mut self.refused_dgram,
            Counter::SkippedMark => &mut self.skipped_mark,
            Counter::SkippedTgid => &mut self.skipped_tgid,
            Counter::SelectedExec => &mut self.selected_exec,
            Counter::SelectedFork => &mut self.selected_fork,
            Counter::TgidExited => &mut self.tgid_exited,
            Counter::MapFull => &mut self.map_full,
            Counter::Established => &mut self.established,
            Counter::Getpeername => &mut self.getpeername,
            Counter::EventsLost => &mut self.events_lost,
            Counter::RefusedNetns => &mut self.refused_netns,
            Counter::SelectedSticky => &mut self.selected_sticky,
            Counter::SelectedScript => &mut self.selected_script,
        };
        *slot = v;
    }
}

/// Logs one ring buffer record; `exe_path` names a selected executable by
/// its (device, inode). Malformed records (wrong size) are reported, not
/// trusted.
pub(super) fn log_event(bytes: &[u8], exe_path: &dyn Fn(ExeKey) -> Option<String>) {
    let Some(ev) = Event::from_bytes(bytes) else {
        tracing::warn!(len = bytes.len(), "malformed kernel event ignored");
        return;
    };
    let comm = ev.comm();
    match ev.kind {
        KYA_EV_MAP_UPDATE_FAILED => tracing::error!(
            pid = ev.pid,
            tid = ev.tid,
            %comm,
            map = map_name(ev.arg0),
            errno = -ev.err,
            "kernel map update failed; the connection or selection was not recorded"
        ),
        KYA_EV_EXE_SELECTED => {
            let exe = exe_path(ExeKey {
                dev: ev.arg0,
                ino: ev.arg1,
            })
            .unwrap_or_default();
            tracing::info!(
                pid = ev.pid,
                %comm,
                %exe,
                dev = ev.arg0,
                ino = ev.arg1,
                "process selected at exec"
            )
        }
        // debug: a QUIC client retrying would otherwise flood the log; the
        // refused_dgram counter has the total
        KYA_EV_REFUSED_DGRAM => tracing::debug!(
            pid = ev.pid,
            %comm,
            port = ev.arg0,
            protocol = ev.arg1,
            "refused non-TCP traffic to a guarded port (EPERM)"
        ),
        // debug: one per refused connect; the namespace is served from the
        // reconcile this event triggers, and refused_netns has the total
        KYA_EV_NETNS_UNSERVED => tracing::debug!(
            pid = ev.pid,
            %comm,
            netns_cookie = ev.arg0,
            port = ev.arg1,
            "refused a connect in a network namespace kya does not serve yet (ECONNREFUSED)"
        ),
        KYA_EV_SELECTED_CGROUP => tracing::debug!(
            tgid = ev.arg0,
            mover = ev.pid,
            %comm,
            "process selected on entering a selected cgroup"
        ),
        other => tracing::warn!(kind = other, pid = ev.pid, "unknown kernel event kind"),
    }
}

fn map_name(id: u64) -> &'static str {
    match id {
        kya_common::maps::KYA_MAP_SOCKETS => "kya_sockets",
        kya_common::maps::KYA_MAP_CONNS => "kya_conns",
        kya_common::maps::KYA_MAP_SEL_TGIDS => "kya_sel_tgids",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_own_field() {
        let mut s = KernelStats::default();
        for (i, c) in Counter::ALL.iter().enumerate() {
            s.set(*c, i as u64 + 1);
        }
        let v = serde_json::to_value(s).unwrap();
        let mut seen: Vec<u64> = v
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_u64().unwrap())
            .collect();
        seen.sort();
        seen.dedup();
        // one distinct value per counter + events_read (0)
        assert_eq!(seen.len(), Counter::ALL.len() + 1);
    }

    #[test]
    fn logging_hostile_events_does_not_panic() {
        let none = |_: ExeKey| None;
        log_event(&[], &none);
        log_event(&[0xff; 48], &none);
        log_event(&[0xff; 4096], &none);
        let mut ev = [0u8; 48];
        ev[0] = KYA_EV_EXE_SELECTED as u8;
        log_event(&ev, &|k: ExeKey| Some(format!("/x/{}", k.ino)));
        let mut b = [0u8; 48];
        b[0] = KYA_EV_MAP_UPDATE_FAILED as u8;
        b[16] = 200;
        log_event(&b, &none);
        for kind in [KYA_EV_NETNS_UNSERVED, KYA_EV_SELECTED_CGROUP, 0xffff] {
            let mut e = [0xffu8; 48];
            e[..4].copy_from_slice(&kind.to_ne_bytes());
            log_event(&e, &none);
        }
        assert_eq!(map_name(200), "unknown");
    }
}
