// Package agents is Loom's host agent: one per host, it makes libvirt match
// the goal states of the host's VMs and reports what it observes. The goal
// is the truth, libvirt is the world, and the agent closes the gap.
//
// What it reads and writes (subjects from package events):
//
//   - loom.goal.<host>.<vm> on LOOM_GOALS: each VM's goal (events.Goal, with
//     its incarnation also in the Loom-Incarnation header), one per subject.
//   - loom.obs.<host>.vm.<vm> on LOOM_EVENTS: vm.observed (the incarnation
//     acted on, the state seen, a fault) and vm.progress. Only this agent
//     writes them.
//   - loom.obs.<host>.host.<host> on LOOM_EVENTS: host.orphan_found and
//     host.orphan_cleared.
//   - loom.live.<host> on LOOM_LIVENESS: renewals (events.Renewal).
//
// The protocol, in the order Run follows it:
//
//  1. Liveness. Every Config.RenewInterval (TTL/3) the agent publishes a
//     renewal expecting the subject sequence of the previous one (the first
//     reads the subject's last message through the stream leader). A
//     rejected renewal means someone else wrote the subject: the agent logs
//     it, re-reads and goes on.
//  2. What it said before. The agent reads the last message on each of its
//     VM subjects (the incarnation and state last reported, and the
//     subject's head) and folds its host subject into the orphans reported
//     and not cleared. With a host key, only messages signed by it count
//     as said: anything else on its subjects is chained after, never
//     believed (sign.go).
//  3. Goals. An ordered consumer delivers the last goal of each of the
//     host's goal subjects, then every new one. The start-up snapshot is
//     complete when nothing is pending. A goal is taken only if its
//     incarnation is above the goal held and not below the last report:
//     a republished old goal does nothing.
//  4. Reconcile, one VM at a time per VM and up to Config.Workers VMs at
//     once. The domain is named after the VM, has the goal's UID as UUID and
//     carries {uid, incarnation, vm} as metadata. Running: define if
//     missing, start, resume. Paused: the same, then suspend. Stopped:
//     shutdown, wait up to Config.StopGrace, destroy. Absent: destroy and
//     undefine. A domain of the VM's name with another UUID is never
//     touched: the VM is reported failed with domain_mismatch. A step
//     libvirt refuses is reported failed with libvirt_error and retried
//     with backoff; while libvirtd is unreachable, VMs with work pending are
//     reported failed with libvirt_unavailable, and every VM is looked at
//     again on reconnection.
//  5. Report on change only: an observation that repeats the last one
//     (incarnation, state, fault) is not published. Each observation is
//     chained to its subject's head (PrevHash) and appended expecting the
//     head's sequence, so a second agent writing the same subjects shows up
//     as a conflict: logged loudly, the subject re-read, the VM retried.
//     Progress is reported at most once a second, only while waiting for a
//     guest to power off; the observation after it is always published.
//     With Config.HostKey every observation is signed (Loom-Sig and
//     Loom-Sig-Key headers) over its subject, the sequence of the
//     subject's last message and its stored bytes (events/hostkey), so the
//     read models take it as the host's only at that place in the chain.
//  6. Drift. A domain that changes by itself (libvirt lifecycle events, a
//     periodic resync, or the first look after start) is reported with
//     Unrequested set, then put back to its goal, with backoff if it keeps
//     changing.
//  7. Orphans. Once the goal snapshot is complete, a domain no goal names is
//     reported host.orphan_found, once, and never touched;
//     host.orphan_cleared follows when it goes away or gets a goal.
//
// Every decision comes from the goal, the last report and what libvirt
// shows now, so an agent killed at any point and started again converges
// without repeating an action or a report.
package agents
