//! Small helpers every part of meshctl uses, and which use nothing of meshctl: duration flags
//! (`10s`, `2m`, `168h`) and error chains written out for people.

use std::time::Duration;

/// Parses `10s`, `1m`, `1500ms` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 10s, 1m, 500ms)"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use ms, s, m or h")),
    };
    if seconds <= 0.0 || !seconds.is_finite() {
        return Err(format!("{text:?}: the timeout must be more than zero"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// An error with its causes, `outer: inner: root`, without repeats.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// The innermost cause of an error (what actually went wrong, e.g. "No such file or directory").
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    if std::ptr::addr_eq(current, err) { err.to_string() } else { format!("{current}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("168h"), Ok(Duration::from_secs(168 * 3600)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn causes_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let err = kube::config::KubeconfigError::ReadConfig(io, "/nope".into());
        assert_eq!(root_cause(&err), "No such file or directory");
        let plain = std::io::Error::other("boom");
        assert_eq!(root_cause(&plain), "boom");
        assert_eq!(chain(&err), "failed to read kubeconfig from '\"/nope\"': No such file or directory");
    }
}
