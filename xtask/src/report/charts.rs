//! The SVG charts of a run directory: the training curve and the sensitivity charts.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::{PruneSensitivity, Report, Sensitivity};

/// Draws each unit's top-1 against its pruning ratio (SVG).
pub fn write_prune_sensitivity_chart(title: &str, sens: &PruneSensitivity, path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let lo = sens.units.iter().flat_map(|u| u.points.iter().map(|p| p.1)).fold(sens.reference_top1, f64::min).max(0.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{title}: {} top-1, one layer pruned at a time", sens.evaluated_on), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..1.0, (lo - 0.01)..(sens.reference_top1 + 0.01).min(1.0))
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("ratio pruned").y_desc("top-1").draw().map_err(|e| err(&e))?;
        for (i, u) in sens.units.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> =
                std::iter::once((0.0, sens.reference_top1)).chain(u.points.iter().map(|p| (p.0, p.1))).collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(u.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 10))
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    shrink_core::io::write_atomic(path, svg.as_bytes())?;
    Ok(())
}

/// Draws the loss increase of each layer quantized alone as a horizontal bar chart (SVG).
pub fn write_sensitivity_chart(title: &str, sens: &Sensitivity, path: &Path) -> Result<()> {
    let n = sens.layers.len().max(1);
    let deltas: Vec<f64> = sens.layers.iter().map(|(_, _, loss)| loss - sens.reference_loss).collect();
    let lo = deltas.iter().copied().fold(0.0, f64::min);
    let hi = deltas.iter().copied().fold(0.0, f64::max).max(lo + 1e-6);
    let mut svg = String::new();
    {
        let height = 80 + 22 * n as u32;
        let root = SVGBackend::with_string(&mut svg, (800, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let names: Vec<String> = sens.layers.iter().map(|(name, _, _)| name.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{title}: test-loss increase, one layer quantized"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(170)
            .build_cartesian_2d(lo..hi * 1.05, -0.5..n as f64 - 0.5)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Bar i (most harmful first, at the top) is centred on y = n - 1 - i.
        chart
            .configure_mesh()
            .y_labels(n)
            .y_label_formatter(&|y| {
                let i = n as f64 - 1.0 - y;
                if (y - y.round()).abs() > 1e-6 || i < -1e-6 {
                    return String::new();
                }
                names.get(i.round() as usize).cloned().unwrap_or_default()
            })
            .x_desc("Δ loss vs f32")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(deltas.iter().enumerate().map(|(i, &d)| {
                let y = (n - 1 - i) as f64;
                Rectangle::new([(0.0, y - 0.35), (d, y + 0.35)], BLUE.filled())
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    shrink_core::io::write_atomic(path, svg.as_bytes())?;
    Ok(())
}

/// Draws training loss and accuracy per epoch of every train stage as an SVG.
pub fn write_training_curve(r: &Report, path: &Path) -> Result<()> {
    let points: Vec<(f64, f64, f64, Option<f64>)> = r
        .stages
        .iter()
        .flat_map(|st| st.history.iter())
        .enumerate()
        .map(|(i, h)| ((i + 1) as f64, h.train_loss, h.train_accuracy, h.validation.as_ref().map(|v| v.top1)))
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (left, right) = root.split_horizontally(400);
        let n = points.len().max(1) as f64;
        let max_loss = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
        let mut loss_chart = ChartBuilder::on(&left)
            .caption(format!("{}: training loss", r.name), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0.5..n + 0.5, 0.0..max_loss)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        loss_chart.configure_mesh().x_desc("epoch").y_desc("loss").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        loss_chart
            .draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), &RED))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let min_acc = points.iter().map(|p| p.2.min(p.3.unwrap_or(1.0))).fold(1.0, f64::min).min(0.9);
        let mut acc_chart = ChartBuilder::on(&right)
            .caption("accuracy (train: blue, validation: green)", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0.5..n + 0.5, min_acc..1.0)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        acc_chart.configure_mesh().x_desc("epoch").y_desc("accuracy").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        acc_chart
            .draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.2)), &BLUE))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        acc_chart
            .draw_series(LineSeries::new(points.iter().filter_map(|p| p.3.map(|v| (p.0, v))), &GREEN))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    shrink_core::io::write_atomic(path, svg.as_bytes())?;
    Ok(())
}

/// A Pareto chart's points: each trial as (label, cost, top-1, on the front), and the baseline
/// as (cost, top-1).
pub struct ParetoPoints {
    pub trials: Vec<(String, f64, f64, bool)>,
    pub baseline: Option<(f64, f64)>,
}

/// Draws top-1 against a cost for a sweep's trials (SVG): every trial a labelled dot, the
/// front's trials filled and joined by a line, the baseline a black cross.
pub fn write_pareto_chart(sweep: &str, cost: &str, p: &ParetoPoints, path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let xs = p.trials.iter().map(|t| t.1).chain(p.baseline.map(|b| b.0));
    let ys = p.trials.iter().map(|t| t.2).chain(p.baseline.map(|b| b.1));
    let (x_lo, x_hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (y_lo, y_hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (x_lo, x_hi) = if x_lo.is_finite() { (0.0_f64.min(x_lo), x_hi.max(x_lo + 1e-9) * 1.08) } else { (0.0, 1.0) };
    let (y_lo, y_hi) =
        if y_lo.is_finite() { ((y_lo - 0.01).max(0.0), (y_hi + 0.005).min(1.0).max(y_lo + 1e-3)) } else { (0.0, 1.0) };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{sweep}: top-1 against {cost} (front: filled, joined)"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(38)
            .y_label_area_size(60)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc(cost).y_desc("top-1").draw().map_err(|e| err(&e))?;
        let mut front: Vec<(f64, f64)> = p.trials.iter().filter(|t| t.3).map(|t| (t.1, t.2)).collect();
        front.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart.draw_series(LineSeries::new(front, BLUE.stroke_width(2))).map_err(|e| err(&e))?;
        chart
            .draw_series(p.trials.iter().map(|(label, x, y, on)| {
                let dot = if *on { BLUE.filled() } else { BLUE.stroke_width(1) };
                EmptyElement::at((*x, *y))
                    + Circle::new((0, 0), 4, dot)
                    + Text::new(label.clone(), (6, -12), ("sans-serif", 11).into_font())
            }))
            .map_err(|e| err(&e))?;
        if let Some((x, y)) = p.baseline {
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at((x, y))
                        + Cross::new((0, 0), 6, BLACK.stroke_width(2))
                        + Text::new("baseline", (8, 4), ("sans-serif", 12).into_font()),
                ))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    shrink_core::io::write_atomic(path, svg.as_bytes())?;
    Ok(())
}
