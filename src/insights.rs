//! Campaign statistics: a campaign's counts (receipts by variant, provider and status; opens
//! and conversions per exposure) into rates, and each variant's conversion rate against the
//! control's with a 95% confidence interval and a two-proportion z-test.
//!
//! For a variant with `x1` conversions out of `n1` exposures (delivered messages) and the
//! control with `x0` out of `n0` (held-out recipients, for the holdout):
//!
//! - `p1 = x1/n1`, `p0 = x0/n0`, lift `d = p1 - p0`;
//! - 95% interval `d ± 1.959964 · sqrt(p1(1-p1)/n1 + p0(1-p0)/n0)` (Wald, unpooled);
//! - `z = d / sqrt(p(1-p)(1/n1 + 1/n0))` with the pooled `p = (x1+x0)/(n1+n0)`, and the
//!   two-sided p-value `erfc(|z|/√2)`;
//! - `significant` when the interval excludes 0.
//!
//! The control is the holdout when the campaign has one, else the variant the caller names,
//! else a variant named `control`, else the first variant by name. No comparison is made when
//! either side has no exposures.

use crate::domain::ReceiptStatus;
use crate::render::content::HOLDOUT;
use crate::store::insights::{CampaignCounts, VariantCounts};

/// The 97.5th percentile of the standard normal distribution.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// A variant against the control.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub lift: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub z: f64,
    pub p_value: f64,
    pub significant: bool,
}

/// One variant's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantReport {
    pub name: String,
    pub is_control: bool,
    pub counts: VariantCounts,
    /// Terminal receipts other than DROPPED.
    pub sent: u64,
    pub delivered: u64,
    /// Terminal receipts other than DELIVERED and DROPPED.
    pub failed: u64,
    pub dropped: u64,
    /// Held-out recipients (the DROPPED receipts of the holdout).
    pub holdout: u64,
    /// Delivered messages, or held-out recipients for the holdout.
    pub exposures: u64,
    pub open_rate: f64,
    pub conversion_rate: f64,
    pub comparison: Option<Comparison>,
}

/// A campaign's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignReport {
    pub control: Option<String>,
    pub variants: Vec<VariantReport>,
}

fn ratio(x: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { x as f64 / n as f64 }
}

/// `x1` of `n1` against `x0` of `n0`; `None` when either side is empty.
pub fn compare(x1: u64, n1: u64, x0: u64, n0: u64) -> Option<Comparison> {
    if n1 == 0 || n0 == 0 {
        return None;
    }
    let (p1, p0) = (ratio(x1, n1), ratio(x0, n0));
    let (n1f, n0f) = (n1 as f64, n0 as f64);
    let lift = p1 - p0;
    let se = (p1 * (1.0 - p1) / n1f + p0 * (1.0 - p0) / n0f).sqrt();
    let pooled = (x1 + x0) as f64 / (n1f + n0f);
    let se_pooled = (pooled * (1.0 - pooled) * (1.0 / n1f + 1.0 / n0f)).sqrt();
    let z = if se_pooled > 0.0 {
        lift / se_pooled
    } else {
        0.0
    };
    let p_value = if se_pooled > 0.0 {
        libm::erfc(z.abs() / std::f64::consts::SQRT_2)
    } else {
        1.0
    };
    let (ci_low, ci_high) = (lift - Z_95 * se, lift + Z_95 * se);
    Some(Comparison {
        lift,
        ci_low,
        ci_high,
        z,
        p_value,
        significant: ci_low > 0.0 || ci_high < 0.0,
    })
}

/// The report of `counts`; `control` names the control variant when the caller chooses it.
pub fn report(counts: &CampaignCounts, control: Option<&str>) -> CampaignReport {
    let control = if counts.contains_key(HOLDOUT) {
        Some(HOLDOUT.to_owned())
    } else if let Some(c) = control.filter(|c| counts.contains_key(*c)) {
        Some(c.to_owned())
    } else if counts.contains_key("control") {
        Some("control".to_owned())
    } else {
        counts.keys().next().cloned()
    };
    let mut variants: Vec<VariantReport> = counts
        .iter()
        .map(|(name, c)| {
            let by = |f: &dyn Fn(ReceiptStatus) -> bool| -> u64 {
                c.receipts
                    .iter()
                    .filter(|((_, s), _)| f(*s))
                    .map(|(_, n)| n)
                    .sum()
            };
            let delivered = by(&|s| s == ReceiptStatus::Delivered);
            let dropped = by(&|s| s == ReceiptStatus::Dropped);
            let failed = by(&|s| !matches!(s, ReceiptStatus::Delivered | ReceiptStatus::Dropped));
            let holdout = if name == HOLDOUT { dropped } else { 0 };
            let exposures = if name == HOLDOUT { holdout } else { delivered };
            VariantReport {
                name: name.clone(),
                is_control: control.as_deref() == Some(name.as_str()),
                counts: c.clone(),
                sent: delivered + failed,
                delivered,
                failed,
                dropped,
                holdout,
                exposures,
                open_rate: ratio(c.opens, delivered),
                conversion_rate: ratio(c.conversions, exposures),
                comparison: None,
            }
        })
        .collect();
    if let Some(base) = variants.iter().find(|v| v.is_control).cloned() {
        for v in variants.iter_mut().filter(|v| !v.is_control) {
            v.comparison = compare(
                v.counts.conversions,
                v.exposures,
                base.counts.conversions,
                base.exposures,
            );
        }
    }
    CampaignReport { control, variants }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z_test_matches_a_textbook_example() {
        // 200 of 1000 vs 150 of 1000: pooled p = 0.175, se = sqrt(.175 * .825 * .002).
        let c = compare(200, 1000, 150, 1000).unwrap();
        assert!((c.lift - 0.05).abs() < 1e-12);
        let se_pooled = (0.175f64 * 0.825 * 0.002).sqrt();
        assert!((c.z - 0.05 / se_pooled).abs() < 1e-9, "{}", c.z);
        assert!((c.z - 2.9424).abs() < 1e-3, "{}", c.z);
        // Two-sided p for z = 2.9424 is 0.00326 (normal table).
        assert!((c.p_value - 0.003257).abs() < 2e-5, "{}", c.p_value);
        let se = (0.2f64 * 0.8 / 1000.0 + 0.15 * 0.85 / 1000.0).sqrt();
        assert!((c.ci_low - (0.05 - Z_95 * se)).abs() < 1e-12);
        assert!(c.significant);
        let c = compare(16, 100, 15, 100).unwrap();
        assert!(!c.significant && c.p_value > 0.5, "{c:?}");
        assert_eq!(compare(1, 0, 1, 10), None);
        let same = compare(0, 10, 0, 10).unwrap();
        assert_eq!((same.z, same.p_value, same.significant), (0.0, 1.0, false));
    }
}
