//! `--residency`'s decision again, on the routing serve has seen since it started: the same
//! forecast as at start (`plan::residency::decision_on`, same model, machine and budget), with
//! the live counts in place of the profile or the prior. Shown in `/spark/status`
//! (`routing.residency_decision_now`) and logged when it differs from the split that runs, so an
//! operator sees when a restart would run a better one (serve reads the profile it rewrote at its
//! next start; the slots are VRAM the running child allocated, so they are not moved under it).
//!
//! Runs on the live thread after a completed request, at most once per [`REDECIDE_EVERY`] and
//! only when routing arrived since the last time: a forecast takes milliseconds to a few hundred
//! on a 48-layer model, and the counts move slowly.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cache::Counts;
use crate::plan::residency::ServeDecision;

/// Least time between two decisions on live counts.
pub const REDECIDE_EVERY: Duration = Duration::from_secs(30);

/// The forecast on given counts: `decision_on` with this serve's model, machine and budget.
pub type DecideFn = Box<dyn Fn(&Counts) -> Result<ServeDecision, String> + Send>;

/// The decision on live counts, as `/spark/status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecisionNow {
    #[serde(flatten)]
    pub decision: ServeDecision,
    /// Whether it differs from the split that runs (what runs, `--n-cpu-moe`, or the slots).
    pub differs: bool,
    /// What an operator can do about it.
    pub note: String,
    /// Routing records folded when it was made.
    pub at_records: u64,
    /// How long the forecast took, µs.
    pub took_us: u64,
}

/// Re-makes the decision on live counts, rate-limited; owned by the live thread.
pub struct Redecider {
    decide: DecideFn,
    running: ServeDecision,
    /// Whether serve rewrites a profile that its next start reads (`--spark`).
    profile_kept: bool,
    last: Option<(Instant, u64)>,
    /// The last decision's summary that was logged, so a log line is written once per change.
    logged: Option<String>,
}

impl Redecider {
    pub fn new(decide: DecideFn, running: ServeDecision, profile_kept: bool) -> Redecider {
        Redecider {
            decide,
            running,
            profile_kept,
            last: None,
            logged: None,
        }
    }

    /// Whether a decision is due at `now` with `records` folded: never twice within
    /// [`REDECIDE_EVERY`], never without new routing. (The caller asks before it copies the
    /// counts.)
    pub fn is_due(&self, records: u64, now: Instant) -> bool {
        records > 0
            && match self.last {
                None => true,
                Some((at, seen)) => seen != records && now.duration_since(at) >= REDECIDE_EVERY,
            }
    }

    /// The decision on `counts` (`records` folded so far) when one is due at `now`: never
    /// twice within [`REDECIDE_EVERY`], never without new routing. `Err` when the forecast
    /// refused (said in the status, not fatal).
    pub fn due(
        &mut self,
        counts: &Counts,
        records: u64,
        now: Instant,
    ) -> Option<Result<DecisionNow, String>> {
        if !self.is_due(records, now) {
            return None;
        }
        self.last = Some((now, records));
        let started = Instant::now();
        let d = match (self.decide)(counts) {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        let took_us = started.elapsed().as_micros() as u64;
        let differs = split_of(&d) != split_of(&self.running);
        let note = match (differs, self.profile_kept) {
            (false, _) => "the split that runs is still the one this forecast chooses".into(),
            (true, true) => "differs from the split that runs: restart serve to run it (the profile it rewrites after every request holds these counts, and serve decides from it at start)".into(),
            (true, false) => "differs from the split that runs: these counts are lost at exit without --spark; start with --spark --profile FILE to keep them, and serve decides from them at its next start".into(),
        };
        let summary = describe(&d);
        if differs && self.logged.as_deref() != Some(summary.as_str()) {
            tracing::info!(
                "residency decision on the routing seen so far: {summary} (running: {}); {note}",
                describe(&self.running)
            );
            self.logged = Some(summary);
        }
        Some(Ok(DecisionNow {
            decision: d,
            differs,
            note,
            at_records: records,
            took_us,
        }))
    }
}

/// What a decision runs: stock or residency, the `--n-cpu-moe`, and the slots (one count, or
/// each host layer's).
#[derive(Debug, PartialEq)]
struct Split {
    run: String,
    n_cpu_moe: Option<u32>,
    slots: Option<u32>,
    slots_per_layer: Option<Vec<(u32, u32)>>,
}

fn split_of(d: &ServeDecision) -> Split {
    Split {
        run: d.run.clone(),
        n_cpu_moe: d.n_cpu_moe,
        slots: d.slots.filter(|_| d.slots_per_layer.is_none()),
        slots_per_layer: d.slots_per_layer.clone(),
    }
}

fn describe(d: &ServeDecision) -> String {
    let slots = match (&d.slots_per_layer, d.slots) {
        (Some(v), _) => format!(
            ", slots per layer {}",
            v.iter()
                .map(|(l, s)| format!("{l}:{s}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        (None, Some(s)) => format!(", {s} slots per host layer"),
        (None, None) => String::new(),
    };
    let n = d
        .n_cpu_moe
        .map_or_else(String::new, |n| format!(" --n-cpu-moe {n}"));
    let tps = match (d.spark_tps, d.stock_tps) {
        (Some(a), Some(b)) if d.run == "residency" => format!(" ({a:.1} against {b:.1} tok/s)"),
        (_, Some(b)) => format!(" ({b:.1} tok/s)"),
        _ => String::new(),
    };
    format!("{}{n}{slots}{tps}", d.run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn decision(run: &str, n: u32, slots: u32) -> ServeDecision {
        ServeDecision {
            run: run.into(),
            slots: (run == "residency").then_some(slots),
            slots_per_layer: None,
            n_cpu_moe: Some(n),
            reason: "test".into(),
            source: None,
            stock_tps: Some(10.0),
            spark_tps: Some(12.0),
            break_even_link_gbps: None,
        }
    }

    /// A stand-in forecast that chooses more slots the more expert 0 of layer 0 was used, and
    /// counts its calls.
    fn redecider(calls: Arc<AtomicU32>, profile_kept: bool) -> Redecider {
        let decide: DecideFn = Box::new(move |c: &Counts| {
            calls.fetch_add(1, Ordering::Relaxed);
            Ok(decision("residency", 3, 4 + (c.get(0, 0) / 100) as u32))
        });
        Redecider::new(decide, decision("residency", 3, 4), profile_kept)
    }

    #[test]
    fn decides_only_with_new_routing_and_at_most_once_per_interval() {
        let calls = Arc::new(AtomicU32::new(0));
        let mut r = redecider(calls.clone(), true);
        let mut c = Counts::zero(2, 8);
        let t0 = Instant::now();
        assert!(r.due(&c, 0, t0).is_none(), "nothing routed yet");
        let same = r.due(&c, 10, t0).unwrap().unwrap();
        assert!(!same.differs, "{same:?}");
        assert_eq!(same.at_records, 10);
        // Within the interval: not again, even with new routing.
        c.set(0, 0, 250);
        assert!(r.due(&c, 20, t0 + Duration::from_secs(5)).is_none());
        // After it, with no new routing: not again.
        assert!(r.due(&c, 10, t0 + REDECIDE_EVERY * 2).is_none());
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        // After it, with new routing: a new split, said to differ, with what to do.
        let later = r.due(&c, 20, t0 + REDECIDE_EVERY * 3).unwrap().unwrap();
        assert_eq!(later.decision.slots, Some(6));
        assert!(later.differs);
        assert!(later.note.contains("restart serve"), "{}", later.note);
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn without_a_kept_profile_the_note_says_how_to_keep_the_counts() {
        let mut r = redecider(Arc::new(AtomicU32::new(0)), false);
        let mut c = Counts::zero(1, 4);
        c.set(0, 0, 900);
        let now = r.due(&c, 5, Instant::now()).unwrap().unwrap();
        assert!(now.differs);
        assert!(now.note.contains("--spark --profile"), "{}", now.note);
    }

    #[test]
    fn the_split_is_what_runs_the_count_and_the_slots() {
        let a = decision("residency", 3, 4);
        assert_eq!(split_of(&a), split_of(&a.clone()));
        let mut b = a.clone();
        b.spark_tps = Some(99.0);
        b.reason = "other words".into();
        assert_eq!(
            split_of(&a),
            split_of(&b),
            "forecast numbers are not the split"
        );
        b.n_cpu_moe = Some(4);
        assert_ne!(split_of(&a), split_of(&b));
        let mut c = a.clone();
        c.slots_per_layer = Some(vec![(0, 2), (1, 6)]);
        assert_ne!(split_of(&a), split_of(&c));
        assert_ne!(split_of(&a), split_of(&decision("stock", 3, 0)));
        assert!(describe(&c).contains("0:2,1:6"), "{}", describe(&c));
    }
}
