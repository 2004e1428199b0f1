//! Printing a benchmark's result: one JSON line, or a two-row table whose
//! columns are the report struct's fields in order.

use serde::Serialize;
use serde_json::Value;

use crate::common::Fail;

/// Prints `report` as one JSON object (`--json`) or as a table.
///
/// # Errors
///
/// If and only if the report cannot be serialized (a bug).
pub fn print<R: Serialize>(json: bool, report: &R) -> Result<(), Fail> {
    let value = serde_json::to_value(report)
        .map_err(|e| Fail::error(format!("cannot write the report: {e}")))?;
    if json {
        println!("{value}");
        return Ok(());
    }
    let Value::Object(map) = value else {
        return Err(Fail::error("a report must be an object"));
    };
    // serde_json keeps the fields in declaration order (preserve_order).
    let cells: Vec<(String, String)> = map
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k, cell(&v)))
        .collect();
    let widths: Vec<usize> = cells.iter().map(|(k, v)| k.len().max(v.len())).collect();
    let line = |f: &dyn Fn(&(String, String)) -> &str| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{:<w$}", f(c), w = *w))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(&|c| &c.0).trim_end());
    println!("{}", line(&|c| &c.1).trim_end());
    Ok(())
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 => format!("{f:.0}"),
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The median of `v` (0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
