//! The haiku check from the original engine's acceptance test, made honest: the word to include
//! is the current minute spelled in English, so no answer can be canned, and the device's
//! greedy ids are compared with the plain-Rust f64 reference's for the same prompt.

/// `n` (0..=59) in English words: 37 → "thirty-seven".
pub fn minute_word(n: u32) -> String {
    const ONES: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 6] = ["", "", "twenty", "thirty", "forty", "fifty"];
    assert!(n < 60, "a minute is below 60, got {n}");
    match n {
        0..=19 => ONES[n as usize].to_string(),
        _ if n.is_multiple_of(10) => TENS[(n / 10) as usize].to_string(),
        _ => format!("{}-{}", TENS[(n / 10) as usize], ONES[(n % 10) as usize]),
    }
}

/// The current UTC minute.
pub fn current_minute() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    ((secs / 60) % 60) as u32
}

/// The user message of the check.
pub fn prompt(word: &str) -> String {
    format!("Write a haiku about GPU computing that includes the word \"{word}\".")
}

/// The largest number of times any token 4-gram occurs in `ids`.
pub fn max_4gram_repeats(ids: &[u32]) -> usize {
    let mut counts = std::collections::HashMap::new();
    for w in ids.windows(4) {
        *counts.entry(w).or_insert(0usize) += 1;
    }
    counts.values().copied().max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minute_words() {
        assert_eq!(minute_word(0), "zero");
        assert_eq!(minute_word(7), "seven");
        assert_eq!(minute_word(17), "seventeen");
        assert_eq!(minute_word(20), "twenty");
        assert_eq!(minute_word(37), "thirty-seven");
        assert_eq!(minute_word(59), "fifty-nine");
    }

    #[test]
    fn four_gram_repeats() {
        assert_eq!(max_4gram_repeats(&[1, 2, 3]), 0);
        assert_eq!(max_4gram_repeats(&[1, 2, 3, 4, 5]), 1);
        assert_eq!(max_4gram_repeats(&[1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]), 3);
    }
}
