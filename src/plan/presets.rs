//! GPU card presets for `spark plan --gpu NAME`: VRAM, VRAM bandwidth and the PCIe link of the
//! cards people run `--n-cpu-moe` on, so a user without the card's figures at hand can still ask
//! whether residency pays. Flags (`--vram-total`, `--vram-bw`, `--h2d-bw`) override each figure.
//!
//! Owns the table and the link arithmetic only; pure data, no I/O.
//!
//! Sources, per figure:
//! - VRAM size, memory bus width and data rate: the vendor's specification page of each card
//!   (NVIDIA: `https://www.nvidia.com/en-us/geforce/graphics-cards/<series>/` "full specs";
//!   workstation cards: `https://www.nvidia.com/en-us/design-visualization/…` data sheets; AMD:
//!   `https://www.amd.com/en/products/graphics/…` specifications). The bandwidth is bus width ÷ 8
//!   × data rate, as the vendors print it (for example the RTX 3060: 192 bit × 15 Gbps ÷ 8 =
//!   360 GB/s), so each row states the two factors it comes from.
//! - PCIe generation and lane count: the same specification pages ("Bus support" / "Interface").
//! - Link rate: the PCI-SIG base specifications give 8, 16 and 32 GT/s per lane for PCIe 3.0,
//!   4.0 and 5.0 with 128b/130b encoding, i.e. 0.985, 1.969 and 3.938 GB/s per lane and
//!   direction (`https://pcisig.com/specifications`). Pinned host-to-device copies reach about
//!   80% of that in practice (the design brief's anchors: PCIe 4 x16 ≈ 24–27 GB/s measured,
//!   Gen5 ≈ 50; the PCIe 3 box ≈ 14 GB/s), so the preset's `h2d` is 80% of the raw
//!   rate: an assumption, printed with the forecast, that `--h2d-bw` replaces with a measurement.

use serde::Serialize;

/// Share of the raw PCIe rate a pinned host-to-device copy reaches (see the module doc).
pub const PINNED_H2D_SHARE: f64 = 0.80;

/// One card.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CardPreset {
    /// Lowercase key for `--gpu`.
    pub key: &'static str,
    pub name: &'static str,
    pub vram_gib: u32,
    /// Memory bus width, bits.
    pub bus_bits: u32,
    /// Memory data rate, Gbps per pin.
    pub data_rate_gbps: f64,
    /// PCIe generation (3, 4, 5) and lanes.
    pub pcie_gen: u8,
    pub pcie_lanes: u8,
    /// Where the figures come from.
    pub source: &'static str,
}

impl CardPreset {
    /// VRAM bandwidth, GB/s: bus width ÷ 8 × data rate.
    pub fn vram_gbps(&self) -> f64 {
        f64::from(self.bus_bits) / 8.0 * self.data_rate_gbps
    }

    /// Raw link rate in one direction, GB/s.
    pub fn link_raw_gbps(&self) -> f64 {
        pcie_lane_gbps(self.pcie_gen) * f64::from(self.pcie_lanes)
    }

    /// The host-to-device rate the forecast assumes: [`PINNED_H2D_SHARE`] of the raw rate.
    pub fn h2d_gbps(&self) -> f64 {
        self.link_raw_gbps() * PINNED_H2D_SHARE
    }

    pub fn vram_mib(&self) -> u64 {
        u64::from(self.vram_gib) * 1024
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} GiB, {} bit × {} Gbps = {:.0} GB/s VRAM, PCIe {}.0 x{} = {:.1} GB/s raw, {:.1} GB/s assumed for pinned copies ({:.0}%) [{}]",
            self.name,
            self.vram_gib,
            self.bus_bits,
            self.data_rate_gbps,
            self.vram_gbps(),
            self.pcie_gen,
            self.pcie_lanes,
            self.link_raw_gbps(),
            self.h2d_gbps(),
            PINNED_H2D_SHARE * 100.0,
            self.source
        )
    }
}

/// GB/s per lane and direction after 128b/130b encoding (PCI-SIG: 8, 16, 32 GT/s).
pub fn pcie_lane_gbps(gen: u8) -> f64 {
    let gts = match gen {
        3 => 8.0,
        4 => 16.0,
        5 => 32.0,
        6 => 64.0, // PAM4 + FLIT: the same 128/130 share is an approximation
        _ => 0.0,
    };
    gts * 128.0 / 130.0 / 8.0
}

const NV_30: &str = "nvidia.com GeForce RTX 30 series specs";
const NV_40: &str = "nvidia.com GeForce RTX 40 series specs";
const NV_50: &str = "nvidia.com GeForce RTX 50 series specs";
const NV_20: &str = "nvidia.com GeForce RTX 20 series specs";
const NV_WS: &str = "nvidia.com RTX workstation data sheet";
const NV_DC: &str = "nvidia.com data-center GPU data sheet";
const AMD: &str = "amd.com Radeon specifications";

macro_rules! card {
    ($key:literal, $name:literal, $gib:expr, $bus:expr, $rate:expr, $gen:expr, $lanes:expr, $src:expr) => {
        CardPreset {
            key: $key,
            name: $name,
            vram_gib: $gib,
            bus_bits: $bus,
            data_rate_gbps: $rate,
            pcie_gen: $gen,
            pcie_lanes: $lanes,
            source: $src,
        }
    };
}

/// The presets: consumer 8–32 GB cards of three PCIe generations and common workstation cards.
pub const CARDS: &[CardPreset] = &[
    card!("rtx2060", "GeForce RTX 2060", 6, 192, 14.0, 3, 16, NV_20),
    card!(
        "rtx2080ti",
        "GeForce RTX 2080 Ti",
        11,
        352,
        14.0,
        3,
        16,
        NV_20
    ),
    card!("tesla-p40", "Tesla P40", 24, 384, 7.2, 3, 16, NV_DC),
    card!(
        "rtx3060",
        "GeForce RTX 3060 12GB",
        12,
        192,
        15.0,
        4,
        16,
        NV_30
    ),
    card!("rtx3070", "GeForce RTX 3070", 8, 256, 14.0, 4, 16, NV_30),
    card!(
        "rtx3080",
        "GeForce RTX 3080 10GB",
        10,
        320,
        19.0,
        4,
        16,
        NV_30
    ),
    card!("rtx3090", "GeForce RTX 3090", 24, 384, 19.5, 4, 16, NV_30),
    card!(
        "rtx4060ti-16",
        "GeForce RTX 4060 Ti 16GB",
        16,
        128,
        18.0,
        4,
        8,
        NV_40
    ),
    card!("rtx4070", "GeForce RTX 4070", 12, 192, 21.0, 4, 16, NV_40),
    card!(
        "rtx4070tis",
        "GeForce RTX 4070 Ti SUPER",
        16,
        256,
        21.0,
        4,
        16,
        NV_40
    ),
    card!("rtx4080", "GeForce RTX 4080", 16, 256, 22.4, 4, 16, NV_40),
    card!("rtx4090", "GeForce RTX 4090", 24, 384, 21.0, 4, 16, NV_40),
    card!(
        "rtx5060ti-16",
        "GeForce RTX 5060 Ti 16GB",
        16,
        128,
        28.0,
        5,
        8,
        NV_50
    ),
    card!("rtx5070", "GeForce RTX 5070", 12, 192, 28.0, 5, 16, NV_50),
    card!(
        "rtx5070ti",
        "GeForce RTX 5070 Ti",
        16,
        256,
        28.0,
        5,
        16,
        NV_50
    ),
    card!("rtx5080", "GeForce RTX 5080", 16, 256, 30.0, 5, 16, NV_50),
    card!("rtx5090", "GeForce RTX 5090", 32, 512, 28.0, 5, 16, NV_50),
    card!("rtx-a4000", "RTX A4000", 16, 256, 14.0, 4, 16, NV_WS),
    card!("rtx-a6000", "RTX A6000", 48, 384, 16.0, 4, 16, NV_WS),
    card!(
        "rtx6000-ada",
        "RTX 6000 Ada Generation",
        48,
        384,
        20.0,
        4,
        16,
        NV_WS
    ),
    card!("rx7900xtx", "Radeon RX 7900 XTX", 24, 384, 20.0, 4, 16, AMD),
];

/// The preset named `key` (case-insensitive; spaces, dashes and underscores ignored).
pub fn find(key: &str) -> Option<&'static CardPreset> {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase()
    };
    let k = norm(key);
    CARDS.iter().find(|c| norm(c.key) == k)
}

/// The keys, for an error message.
pub fn keys() -> String {
    CARDS.iter().map(|c| c.key).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_bandwidths_follow_from_bus_and_rate() {
        // The figures the vendors print, recomputed from the two factors.
        for (key, gbps) in [
            ("rtx3060", 360.0),
            ("rtx3090", 936.0),
            ("rtx4090", 1008.0),
            ("rtx4060ti-16", 288.0),
            ("rtx5070ti", 896.0),
            ("rtx5090", 1792.0),
            ("tesla-p40", 345.6),
        ] {
            let c = find(key).unwrap();
            assert!(
                (c.vram_gbps() - gbps).abs() < 1e-9,
                "{key}: {}",
                c.vram_gbps()
            );
        }
    }

    #[test]
    fn links_by_generation_and_lanes() {
        let g3 = find("RTX 2080 Ti").unwrap();
        assert!((g3.link_raw_gbps() - 15.754).abs() < 0.01);
        let g4 = find("rtx3060").unwrap();
        assert!((g4.link_raw_gbps() - 31.508).abs() < 0.01);
        // x8 cards get half the lanes.
        let x8 = find("rtx4060ti_16").unwrap();
        assert!((x8.link_raw_gbps() - g4.link_raw_gbps() / 2.0).abs() < 1e-9);
        let g5 = find("rtx5070ti").unwrap();
        assert!((g5.h2d_gbps() - 2.0 * g4.h2d_gbps()).abs() < 1e-9);
        assert!(find("no-such-card").is_none());
        let keys: Vec<&str> = CARDS.iter().map(|c| c.key).collect();
        let mut dedup = keys.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(dedup.len(), keys.len(), "duplicate preset keys");
    }
}
