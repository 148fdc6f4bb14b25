//! The globals and filters transformers adds to a chat template's Jinja environment
//! (`transformers/utils/chat_template_utils.py`), written to give Python's output:
//! `raise_exception(message)`, `strftime_now(format)` and the `tojson` filter (Python's
//! `json.dumps`, without Jinja's HTML escaping).

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// `raise_exception(message)`: fails the render with the template's message.
pub fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time formatted as Python's `datetime.now().strftime`
/// does (in UTC, which is the local time on a machine set to UTC).
pub fn strftime_now(format: String) -> Result<Value, Error> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(seconds, &format)
        .map(Value::from)
        .map_err(|message| Error::new(ErrorKind::InvalidOperation, message))
}

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// The civil date and time of `seconds` since the Unix epoch (UTC).
struct DateTime {
    year: i64,
    /// 1..=12
    month: usize,
    /// 1..=31
    day: i64,
    /// 1..=366
    day_of_year: i64,
    /// 0 = Monday
    weekday: usize,
    hour: i64,
    minute: i64,
    second: i64,
}

impl DateTime {
    fn from_unix(seconds: i64) -> Self {
        let days = seconds.div_euclid(86_400);
        let secs = seconds.rem_euclid(86_400);
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let before_month = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let day_of_year = before_month[month as usize - 1] + day + i64::from(leap && month > 2);
        Self {
            year,
            month: month as usize,
            day,
            day_of_year,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as usize,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
        }
    }
}

/// Formats `seconds` since the epoch (UTC) as Python's `strftime` does on Linux, for the
/// directives chat templates use: `%a %A %b %B %d %e %H %I %j %m %M %p %S %y %Y %%`, and
/// glibc's `%-d` form without padding for the numeric ones.
pub fn strftime(seconds: i64, format: &str) -> Result<String, String> {
    let t = DateTime::from_unix(seconds);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut directive = chars.next();
        let pad = directive != Some('-');
        if !pad {
            directive = chars.next();
        }
        let number = |value: i64, width: usize| {
            if pad {
                format!("{value:0width$}")
            } else {
                value.to_string()
            }
        };
        let hour12 = (t.hour + 11) % 12 + 1;
        let piece = match directive {
            Some('a') => DAYS[t.weekday][..3].to_string(),
            Some('A') => DAYS[t.weekday].to_string(),
            Some('b') => MONTHS[t.month - 1][..3].to_string(),
            Some('B') => MONTHS[t.month - 1].to_string(),
            Some('d') => number(t.day, 2),
            Some('e') => format!("{:2}", t.day),
            Some('H') => number(t.hour, 2),
            Some('I') => number(hour12, 2),
            Some('j') => number(t.day_of_year, 3),
            Some('m') => number(t.month as i64, 2),
            Some('M') => number(t.minute, 2),
            Some('p') => (if t.hour < 12 { "AM" } else { "PM" }).to_string(),
            Some('S') => number(t.second, 2),
            Some('y') => number(t.year % 100, 2),
            Some('Y') => t.year.to_string(),
            Some('%') if pad => "%".to_string(),
            other => {
                let shown: String = other.into_iter().collect();
                let dash = if pad { "" } else { "-" };
                return Err(format!(
                    "strftime_now: unsupported directive %{dash}{shown} in {format:?}"
                ));
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// The longest indent `tojson` takes, where Python takes any (and runs out of memory on a
/// huge one, repeated at every level of every line).
const MAX_INDENT: usize = 256;

/// How `json.dumps` lays a value out.
struct JsonStyle {
    ensure_ascii: bool,
    /// The indentation of one level; `None` writes everything on one line.
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// The `tojson` filter as transformers defines it:
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, each
/// option a keyword argument.
pub fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match (v.as_i64(), v.as_str()) {
            // Python indents by nothing below zero; a count past the limit is refused below.
            (Some(n), _) => " ".repeat(n.clamp(0, MAX_INDENT as i64 + 1) as usize),
            (None, Some(s)) => s.to_string(),
            _ => return Err(invalid("tojson: indent must be an integer or a string")),
        }),
    };
    if indent.as_ref().is_some_and(|unit| unit.len() > MAX_INDENT) {
        return Err(invalid(&format!(
            "tojson: indent longer than {MAX_INDENT} characters"
        )));
    }
    let (item_separator, key_separator) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(pair) => match <[String; 2]>::try_from(pair) {
            Ok([item, key]) => (item, key),
            Err(_) => return Err(invalid("tojson: separators must be (item, key)")),
        },
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        ensure_ascii,
        indent,
        item_separator,
        key_separator,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, &value, &style, 0)?;
    Ok(Value::from(out))
}

fn invalid(message: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.to_string())
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => out.push_str(&python_float(f64::try_from(value.clone())?)),
        ValueKind::String => write_string(out, value.as_str().unwrap_or_default(), style),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, ('[', ']'), &items, style, depth, |out, item| {
                write_json(out, item, style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.as_str() {
                    Some(s) => s.to_string(),
                    None => {
                        let mut k = String::new();
                        write_json(&mut k, &key, style, depth)?;
                        k
                    }
                };
                entries.push((key, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(
                out,
                ('{', '}'),
                &entries,
                style,
                depth,
                |out, (key, item)| {
                    write_string(out, key, style);
                    out.push_str(&style.key_separator);
                    write_json(out, item, style, depth + 1)
                },
            )?;
        }
        _ => {
            return Err(invalid(&format!(
                "tojson: Object of type {} is not JSON serializable",
                value.kind()
            )))
        }
    }
    Ok(())
}

/// `[a, b]` or, indented, one item a line.
fn write_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: &[T],
    style: &JsonStyle,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |level: usize| {
        style
            .indent
            .as_ref()
            .map(|unit| format!("\n{}", unit.repeat(level)))
    };
    out.push_str(&newline(depth + 1).unwrap_or_default());
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_separator);
            out.push_str(&newline(depth + 1).unwrap_or_default());
        }
        write_item(out, item)?;
    }
    out.push_str(&newline(depth).unwrap_or_default());
    out.push(close);
    Ok(())
}

fn write_string(out: &mut String, s: &str, style: &JsonStyle) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (style.ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional for exponents from
/// -4 to 15 and `1e+16` style outside, `NaN` and `Infinity` as `json.dumps` writes them.
fn python_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let scientific = format!("{v:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .map(|(m, e)| (m.to_string(), e.parse::<i32>().unwrap_or(0)))
        .unwrap_or((scientific.clone(), 0));
    if (-4..16).contains(&exponent) {
        let positional = format!("{v}");
        if positional.contains('.') {
            positional
        } else {
            positional + ".0"
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}
