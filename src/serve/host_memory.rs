//! Where host-resident expert weights live under `--residency`: pinned or memory-mapped.
//!
//! Owns one decision and its reason. llama.cpp puts weights that stay in host memory into the
//! GPU backend's pinned host buffer type (`CUDA_Host`, `Vulkan_Host`) only when the model is not
//! memory-mapped (`--load-mode none`); mapped weights are pageable, and every streamed expert
//! then crosses the link from pageable memory, about a third of the speed others measured
//! (96.5 against 30.6 tok/s, same 48 slots, RTX 5070 Ti). So under `--residency` spark asks
//! for `--load-mode none` when the host part fits in available RAM with a margin, and says
//! which it chose and why: the user's own `--load-mode` (after `--` or `LLAMA_ARG_LOAD_MODE`)
//! always wins, and too little RAM keeps the map (pinned memory cannot be paged out).
//!
//! Pure: the caller reads RAM and the arguments; nothing here does I/O.

use serde::Serialize;

/// The user's choice (`--host-memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostMemoryChoice {
    /// Pinned when the host part fits in available RAM, else mapped.
    Auto,
    /// Pinned, or refuse to start (exit 3) when it cannot fit.
    Pinned,
    /// Memory-mapped (llama.cpp's default).
    Mapped,
}

/// Where the host-resident weights live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostMemory {
    Pinned,
    Mapped,
}

/// The decision, its reason, and the arguments it adds to llama-server's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostMemoryPlan {
    pub host_memory: HostMemory,
    pub reason: String,
    /// Bytes that stay in host memory (pinned when `host_memory` is pinned).
    pub host_bytes: u64,
    #[serde(skip)]
    pub args: Vec<String>,
}

/// Why a pinned start was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--host-memory pinned: the host part needs {need} MiB of pinned memory but only {avail} MiB of RAM are available (keeping {margin} MiB free); use --host-memory auto or mapped, or fewer host-resident experts")]
pub struct PinnedRefused {
    pub need: u64,
    pub avail: u64,
    pub margin: u64,
}

/// RAM kept free beside pinned weights: a tenth of the machine, at least 1 GiB.
pub fn margin_bytes(ram_total: u64) -> u64 {
    (ram_total / 10).max(1 << 30)
}

/// The load mode the user set for llama-server, if any: `--load-mode X`, `--load-mode=X`,
/// `-lm X` after `--`, else `LLAMA_ARG_LOAD_MODE`.
pub fn user_load_mode(server_args: &[String], env_load_mode: Option<&str>) -> Option<String> {
    let mut it = server_args.iter();
    let mut found = None;
    while let Some(a) = it.next() {
        if a == "--load-mode" || a == "-lm" {
            found = Some(it.next().cloned().unwrap_or_default());
        } else if let Some(v) = a.strip_prefix("--load-mode=") {
            found = Some(v.to_string());
        }
    }
    found.or_else(|| env_load_mode.map(str::to_string))
}

/// Decides where the `host_bytes` of host-resident weights live.
pub fn decide(
    choice: HostMemoryChoice,
    host_bytes: u64,
    ram_total: u64,
    ram_available: u64,
    user_mode: Option<&str>,
) -> Result<HostMemoryPlan, PinnedRefused> {
    let mib = |b: u64| b >> 20;
    let plan = |host_memory, reason: String, args: Vec<String>| HostMemoryPlan {
        host_memory,
        reason,
        host_bytes,
        args,
    };
    if let Some(mode) = user_mode {
        let host_memory = if mode == "none" || mode == "dio" {
            HostMemory::Pinned
        } else {
            HostMemory::Mapped
        };
        return Ok(plan(
            host_memory,
            format!("the user's own --load-mode {mode} (passed to llama-server unchanged)"),
            Vec::new(),
        ));
    }
    let margin = margin_bytes(ram_total);
    let room = ram_available.saturating_sub(margin);
    let pinned = || {
        plan(
            HostMemory::Pinned,
            format!(
                "{} MiB of host-resident weights fit in {} MiB of available RAM (keeping {} MiB free): --load-mode none",
                mib(host_bytes),
                mib(ram_available),
                mib(margin)
            ),
            vec!["--load-mode".into(), "none".into()],
        )
    };
    match choice {
        HostMemoryChoice::Mapped => Ok(plan(
            HostMemory::Mapped,
            "--host-memory mapped".into(),
            Vec::new(),
        )),
        HostMemoryChoice::Pinned if host_bytes <= room => Ok(pinned()),
        HostMemoryChoice::Pinned => Err(PinnedRefused {
            need: mib(host_bytes),
            avail: mib(ram_available),
            margin: mib(margin),
        }),
        HostMemoryChoice::Auto if host_bytes <= room => Ok(pinned()),
        HostMemoryChoice::Auto => Ok(plan(
            HostMemory::Mapped,
            format!(
                "not enough RAM to pin: {} MiB of host-resident weights, {} MiB available (keeping {} MiB free); streamed experts come from pageable memory",
                mib(host_bytes),
                mib(ram_available),
                mib(margin)
            ),
            Vec::new(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_users_load_mode_is_found_in_every_spelling_and_wins_over_the_environment() {
        assert_eq!(user_load_mode(&s(&["-ngl", "99"]), None), None);
        assert_eq!(
            user_load_mode(&s(&["--load-mode", "mmap"]), None).as_deref(),
            Some("mmap")
        );
        assert_eq!(
            user_load_mode(&s(&["-lm", "none"]), None).as_deref(),
            Some("none")
        );
        assert_eq!(
            user_load_mode(&s(&["--load-mode=mlock"]), None).as_deref(),
            Some("mlock")
        );
        assert_eq!(user_load_mode(&[], Some("auto")).as_deref(), Some("auto"));
        assert_eq!(
            user_load_mode(&s(&["-lm", "none"]), Some("mmap")).as_deref(),
            Some("none")
        );
    }

    #[test]
    fn auto_pins_what_fits_and_keeps_the_map_otherwise_with_the_reason() {
        let p = decide(HostMemoryChoice::Auto, 10 * GIB, 64 * GIB, 40 * GIB, None).unwrap();
        assert_eq!(p.host_memory, HostMemory::Pinned);
        assert_eq!(p.args, s(&["--load-mode", "none"]));
        // 40 GiB available less a 6.4 GiB margin leaves 33.6: 34 GiB does not fit.
        let p = decide(HostMemoryChoice::Auto, 34 * GIB, 64 * GIB, 40 * GIB, None).unwrap();
        assert_eq!(p.host_memory, HostMemory::Mapped);
        assert!(p.args.is_empty());
        assert!(
            p.reason.starts_with("not enough RAM to pin"),
            "{}",
            p.reason
        );
    }

    #[test]
    fn pinned_refuses_what_cannot_fit_and_mapped_never_pins() {
        let e = decide(HostMemoryChoice::Pinned, 34 * GIB, 64 * GIB, 40 * GIB, None).unwrap_err();
        assert_eq!(e.need, 34 * 1024);
        assert!(e.to_string().contains("--host-memory pinned"));
        let p = decide(HostMemoryChoice::Mapped, GIB, 64 * GIB, 40 * GIB, None).unwrap();
        assert_eq!(p.host_memory, HostMemory::Mapped);
        assert!(p.args.is_empty());
    }

    #[test]
    fn the_users_own_mode_is_reported_and_nothing_is_added() {
        for (mode, want) in [("none", HostMemory::Pinned), ("mmap", HostMemory::Mapped)] {
            let p = decide(HostMemoryChoice::Pinned, 100 * GIB, 64 * GIB, 1, Some(mode)).unwrap();
            assert_eq!(p.host_memory, want);
            assert!(p.args.is_empty());
            assert!(p.reason.contains(mode));
        }
    }

    #[test]
    fn the_margin_is_a_tenth_of_ram_and_at_least_a_gib() {
        assert_eq!(margin_bytes(4 * GIB), GIB);
        assert_eq!(margin_bytes(100 * GIB), 10 * GIB);
    }
}
