//! Which texts a recipient gets: per-locale texts with fallback, and the variants and holdout
//! of an experiment, with deterministic assignment.
//!
//! Every combination of a variant (or the template alone) and one of its locales is compiled
//! once per batch into a *content set* (title, subtitle, body); a recipient carries only the
//! index of its set (packed with it), and its receipt the set's label (variant, locale).
//!
//! - **Locale**: the recipient's `locale`, lower-cased with `_` read as `-`, is looked up
//!   whole, then without its last `-` part, and so on (`pt-BR` -> `pt`); no match is the
//!   default texts. An empty field of a locale entry is the default text's.
//! - **Variant**: a variant's non-empty texts replace the template's. Its locales are its own
//!   when it has some; a variant with texts but no locales sends its texts to every locale; a
//!   variant with neither (a control) is the template with the template's locales.
//! - **Assignment**: `h = xxh3_64(campaign_id, 0, user_id or else message_id)`. The recipient
//!   is held out when `h % 10000 < holdout_bp`; otherwise its variant is the one whose
//!   cumulative weight range holds `(h >> 32) % total_weight`. The variant does not depend on
//!   the holdout share, and the same user keeps the same variant in every batch of the
//!   campaign (on every replica and release: xxh3 is specified and stable).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::template::Text;
use crate::domain::{ContentLabel, Experiment, FieldError, LocalizedText, Template};

/// Variants in one experiment, at most.
pub const MAX_VARIANTS: usize = 10;
/// Locale entries in a template or a variant, at most.
pub const MAX_LOCALES: usize = 50;
/// The variant name of held-out recipients.
pub const HOLDOUT: &str = "holdout";
/// The variant name when an experiment has a holdout but no variants.
pub const DEFAULT_VARIANT: &str = "default";

/// The parsed texts one recipient is rendered with.
#[derive(Debug, Clone, Default)]
pub struct Texts {
    pub title: Text,
    pub subtitle: Text,
    pub body: Text,
}

impl Texts {
    fn iter(&self) -> impl Iterator<Item = &Text> {
        [&self.title, &self.subtitle, &self.body].into_iter()
    }
}

/// One variant (or the template alone): its default set and its locales' sets.
#[derive(Debug, Clone)]
struct Arm {
    /// Cumulative weight up to and including this arm.
    weight_end: u64,
    default_set: u16,
    /// Normalized locale key and its set, sorted by key.
    locales: Vec<(String, u16)>,
}

/// What a recipient is to get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Render content set `set`.
    Send { set: u16 },
    /// Held out: not sent.
    Holdout,
}

/// All content sets of a template, and how recipients are assigned to them.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    sets: Vec<Texts>,
    labels: Vec<ContentLabel>,
    arms: Vec<Arm>,
    holdout_bp: u32,
    holdout_label: ContentLabel,
    experiment: bool,
}

fn normalize(tag: &str) -> String {
    tag.trim().to_ascii_lowercase().replace('_', "-")
}

fn check_locale_key(field: &str, key: &str) -> Result<(), FieldError> {
    let ok = !key.is_empty()
        && key.len() <= 35
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            format!("{field}.{key}"),
            "a locale key is a language tag such as `pt-BR` (letters, digits, `-`, `_`; at most 35 bytes)",
        ))
    }
}

/// `over`'s non-empty fields over `base`.
fn layered(base: &LocalizedText, over: &LocalizedText) -> LocalizedText {
    let pick = |o: &String, b: &String| if o.is_empty() { b.clone() } else { o.clone() };
    LocalizedText {
        title: pick(&over.title, &base.title),
        subtitle: pick(&over.subtitle, &base.subtitle),
        body: pick(&over.body, &base.body),
    }
}

impl Contents {
    /// Compiles every content set of `template`; errors name the field (`template.locales.pt.title`,
    /// `template.experiment.variants[1].name`, ...).
    pub fn compile(template: &Template) -> Result<Contents, FieldError> {
        let base = LocalizedText {
            title: template.title.clone(),
            subtitle: template.subtitle.clone(),
            body: template.body.clone(),
        };
        let mut contents = Contents::default();
        let no_experiment = Experiment::default();
        let experiment = template.experiment.as_ref().unwrap_or(&no_experiment);
        contents.experiment = template.experiment.is_some();
        if experiment.variants.len() > MAX_VARIANTS {
            return Err(FieldError::new(
                "template.experiment.variants",
                format!(
                    "{} variants; at most {MAX_VARIANTS}",
                    experiment.variants.len()
                ),
            ));
        }
        if experiment.holdout_bp >= 10_000 {
            return Err(FieldError::new(
                "template.experiment.holdout_share",
                "must be below 1",
            ));
        }
        contents.holdout_bp = experiment.holdout_bp;
        contents.holdout_label = ContentLabel {
            variant: Some(HOLDOUT.into()),
            locale: None,
        };
        let all_zero = experiment.variants.iter().all(|v| v.weight == 0);
        let mut names = HashSet::new();
        let mut weight_end = 0u64;
        if experiment.variants.is_empty() {
            let name = contents.experiment.then(|| Arc::from(DEFAULT_VARIANT));
            contents.arm(&base, &template.locales, "template", name, 1)?;
        }
        for (i, v) in experiment.variants.iter().enumerate() {
            let field = format!("template.experiment.variants[{i}]");
            let name = v.name.trim();
            if name.is_empty() || name.len() > 64 || name == HOLDOUT || name.contains('|') {
                return Err(FieldError::new(
                    format!("{field}.name"),
                    format!(
                        "a variant needs a name of 1 to 64 bytes, without `|`, not `{HOLDOUT}`"
                    ),
                ));
            }
            if !names.insert(name) {
                return Err(FieldError::new(
                    format!("{field}.name"),
                    format!("variant name `{name}` is used twice"),
                ));
            }
            let weight = if all_zero { 1 } else { u64::from(v.weight) };
            let (texts, locales) = if v.texts.is_empty() && v.locales.is_empty() {
                (base.clone(), &template.locales)
            } else {
                (layered(&base, &v.texts), &v.locales)
            };
            contents.arm(&texts, locales, &field, Some(Arc::from(name)), weight)?;
        }
        for arm in &mut contents.arms {
            weight_end += arm.weight_end;
            arm.weight_end = weight_end;
        }
        Ok(contents)
    }

    /// Adds one arm: its default set and one set per locale (its `weight_end` holds the
    /// arm's own weight until [`Self::compile`] accumulates them).
    fn arm(
        &mut self,
        base: &LocalizedText,
        locales: &BTreeMap<String, LocalizedText>,
        field: &str,
        variant: Option<Arc<str>>,
        weight: u64,
    ) -> Result<(), FieldError> {
        let locales_field = if field == "template" {
            "template.locales".to_owned()
        } else {
            format!("{field}.locales")
        };
        if locales.len() > MAX_LOCALES {
            return Err(FieldError::new(
                locales_field,
                format!("{} locales; at most {MAX_LOCALES}", locales.len()),
            ));
        }
        let default_set = self.push(base, field, variant.clone(), None)?;
        let mut table = Vec::with_capacity(locales.len());
        for (key, texts) in locales {
            check_locale_key(&locales_field, key)?;
            let set = self.push(
                &layered(base, texts),
                &format!("{locales_field}.{key}"),
                variant.clone(),
                Some(Arc::from(key.as_str())),
            )?;
            table.push((normalize(key), set));
        }
        table.sort_by(|a, b| a.0.cmp(&b.0));
        self.arms.push(Arm {
            weight_end: weight,
            default_set,
            locales: table,
        });
        Ok(())
    }

    fn push(
        &mut self,
        texts: &LocalizedText,
        field: &str,
        variant: Option<Arc<str>>,
        locale: Option<Arc<str>>,
    ) -> Result<u16, FieldError> {
        let parse = |name: &str, source: &str| {
            Text::parse(source)
                .map_err(|e| FieldError::new(format!("{field}.{name}"), e.to_string()))
        };
        let set = Texts {
            title: parse("title", &texts.title)?,
            subtitle: parse("subtitle", &texts.subtitle)?,
            body: parse("body", &texts.body)?,
        };
        let index = u16::try_from(self.sets.len())
            .map_err(|_| FieldError::new(field, "too many content sets"))?;
        self.sets.push(set);
        self.labels.push(ContentLabel { variant, locale });
        Ok(index)
    }

    /// Content set `i` (the default set for an index out of range).
    pub fn set(&self, i: u16) -> &Texts {
        static EMPTY: std::sync::OnceLock<Texts> = std::sync::OnceLock::new();
        self.sets
            .get(usize::from(i))
            .or_else(|| self.sets.first())
            .unwrap_or_else(|| EMPTY.get_or_init(Texts::default))
    }

    /// Every content set.
    pub fn sets(&self) -> &[Texts] {
        &self.sets
    }

    /// The label receipts of set `i` carry.
    pub fn label(&self, i: u16) -> ContentLabel {
        self.labels.get(usize::from(i)).cloned().unwrap_or_default()
    }

    /// The label of a held-out recipient.
    pub fn holdout_label(&self) -> ContentLabel {
        self.holdout_label.clone()
    }

    /// True when the template has an experiment (assignment needs a campaign id).
    pub fn has_experiment(&self) -> bool {
        self.experiment
    }

    /// Every text of every set.
    pub fn texts(&self) -> impl Iterator<Item = &Text> {
        self.sets.iter().flat_map(Texts::iter)
    }

    /// The content of a recipient of `campaign` with `user_id` (else `message_id`) and
    /// `locale`. See the module docs.
    pub fn choose(&self, campaign: &str, user_id: &str, message_id: &str, locale: &str) -> Choice {
        let arm = if self.experiment {
            let key = if user_id.is_empty() {
                message_id
            } else {
                user_id
            };
            let h = assignment_hash(campaign, key);
            if h % 10_000 < u64::from(self.holdout_bp) {
                return Choice::Holdout;
            }
            let total = self.arms.last().map_or(1, |a| a.weight_end).max(1);
            let point = (h >> 32) % total;
            self.arms.iter().find(|a| point < a.weight_end)
        } else {
            self.arms.first()
        };
        let Some(arm) = arm else {
            return Choice::Send { set: 0 };
        };
        Choice::Send {
            set: Self::locale_set(arm, locale),
        }
    }

    fn locale_set(arm: &Arm, locale: &str) -> u16 {
        if arm.locales.is_empty() || locale.is_empty() {
            return arm.default_set;
        }
        let mut tag = normalize(locale);
        loop {
            if let Ok(i) = arm.locales.binary_search_by(|(k, _)| k.as_str().cmp(&tag)) {
                return arm.locales[i].1;
            }
            match tag.rfind('-') {
                Some(cut) => tag.truncate(cut),
                None => return arm.default_set,
            }
        }
    }
}

/// The assignment hash of a recipient of `campaign` keyed by `key` (user id, else message id).
pub fn assignment_hash(campaign: &str, key: &str) -> u64 {
    let mut buf = Vec::with_capacity(campaign.len() + 1 + key.len());
    buf.extend_from_slice(campaign.as_bytes());
    buf.push(0);
    buf.extend_from_slice(key.as_bytes());
    xxhash_rust::xxh3::xxh3_64(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Variant;

    fn text(t: &str, b: &str) -> LocalizedText {
        LocalizedText {
            title: t.into(),
            subtitle: String::new(),
            body: b.into(),
        }
    }

    fn template() -> Template {
        Template {
            title: "Hello".into(),
            body: "Default body".into(),
            locales: [
                ("pt".to_string(), text("Olá", "")),
                ("pt-BR".to_string(), text("Oi", "Corpo")),
                ("es".to_string(), text("Hola", "Cuerpo")),
            ]
            .into(),
            ..Template::default()
        }
    }

    fn title_of(c: &Contents, locale: &str) -> (String, String, Option<Arc<str>>) {
        let Choice::Send { set } = c.choose("c", "u", "m", locale) else {
            panic!("held out");
        };
        let t = c.set(set);
        (
            t.title.source().to_owned(),
            t.body.source().to_owned(),
            c.label(set).locale,
        )
    }

    #[test]
    fn locales_fall_back_from_region_to_language_to_default() {
        let c = Contents::compile(&template()).unwrap();
        assert_eq!(title_of(&c, "pt-BR").0, "Oi");
        assert_eq!(title_of(&c, "pt_br").0, "Oi");
        let pt_pt = title_of(&c, "pt-PT");
        assert_eq!(
            (pt_pt.0.as_str(), pt_pt.1.as_str()),
            ("Olá", "Default body")
        );
        assert_eq!(pt_pt.2.as_deref(), Some("pt"));
        assert_eq!(title_of(&c, "zh-Hant-TW").0, "Hello");
        assert_eq!(title_of(&c, "zh-Hant-TW").2, None);
        assert_eq!(title_of(&c, "").0, "Hello");
        let mut bad = template();
        bad.locales.insert("pt BR".into(), text("x", ""));
        assert_eq!(
            Contents::compile(&bad).unwrap_err().field,
            "template.locales.pt BR"
        );
        let mut bad = template();
        bad.locales.insert("de".into(), text("{{ x", ""));
        let e = Contents::compile(&bad).unwrap_err();
        assert_eq!(e.field, "template.locales.de.title");
        assert!(e.reason.starts_with("line 1, column 1"), "{e}");
    }

    fn experiment(holdout_bp: u32, weights: &[u32]) -> Template {
        let mut t = template();
        t.experiment = Some(Experiment {
            variants: weights
                .iter()
                .enumerate()
                .map(|(i, w)| Variant {
                    name: format!("v{i}"),
                    weight: *w,
                    texts: if i == 0 {
                        LocalizedText::default()
                    } else {
                        text(&format!("Title {i}"), "")
                    },
                    locales: BTreeMap::new(),
                })
                .collect(),
            holdout_bp,
        });
        t
    }

    #[test]
    fn assignment_is_deterministic_and_follows_weights_and_holdout() {
        let c = Contents::compile(&experiment(1_000, &[1, 1, 2])).unwrap();
        let mut counts = [0usize; 4];
        for u in 0..20_000 {
            let user = format!("user-{u}");
            let choice = c.choose("spring", &user, "ignored", "");
            assert_eq!(choice, c.choose("spring", &user, "other-message", "fr"));
            match choice {
                Choice::Holdout => counts[3] += 1,
                Choice::Send { set } => {
                    let name = c.label(set).variant.unwrap();
                    counts[name[1..].parse::<usize>().unwrap()] += 1;
                }
            }
        }
        // 10% holdout, then 1:1:2 of the rest (binomial noise well within these bounds).
        assert!((1_700..2_300).contains(&counts[3]), "{counts:?}");
        assert!((4_000..5_000).contains(&counts[0]), "{counts:?}");
        assert!((4_000..5_000).contains(&counts[1]), "{counts:?}");
        assert!((8_500..9_500).contains(&counts[2]), "{counts:?}");
        // A control variant (no texts) keeps the template's locales; others their own texts.
        let Choice::Send { set } = (0..100)
            .map(|u| c.choose("spring", &format!("user-{u}"), "", "pt-BR"))
            .find(|ch| matches!(ch, Choice::Send { set } if c.label(*set).variant.as_deref() == Some("v0")))
            .unwrap()
        else {
            unreachable!()
        };
        assert_eq!(c.set(set).title.source(), "Oi");
        assert_eq!(c.label(set).locale.as_deref(), Some("pt-BR"));
        // Without a user id the message id decides.
        assert_eq!(
            c.choose("spring", "", "m-1", ""),
            c.choose("spring", "", "m-1", "")
        );
        // The variant does not depend on the holdout share.
        let no_holdout = Contents::compile(&experiment(0, &[1, 1, 2])).unwrap();
        for u in 0..500 {
            let user = format!("user-{u}");
            if let Choice::Send { set } = c.choose("spring", &user, "", "") {
                let Choice::Send { set: other } = no_holdout.choose("spring", &user, "", "") else {
                    panic!("no holdout");
                };
                assert_eq!(c.label(set).variant, no_holdout.label(other).variant);
            }
        }
    }

    #[test]
    fn experiment_validation_names_the_field() {
        let err = |t: Template| Contents::compile(&t).unwrap_err().field;
        assert_eq!(err(experiment(0, &[1; 11])), "template.experiment.variants");
        let mut t = experiment(0, &[1, 1]);
        t.experiment.as_mut().unwrap().variants[1].name = "v0".into();
        assert_eq!(err(t), "template.experiment.variants[1].name");
        let mut t = experiment(0, &[1]);
        t.experiment.as_mut().unwrap().variants[0].name = "holdout".into();
        assert_eq!(err(t), "template.experiment.variants[0].name");
        assert_eq!(
            err(experiment(10_000, &[1])),
            "template.experiment.holdout_share"
        );
        let mut t = experiment(0, &[1, 1]);
        t.experiment.as_mut().unwrap().variants[1].texts.body = "{% if %}".into();
        assert_eq!(err(t), "template.experiment.variants[1].body");
        // A holdout alone: everyone else gets the template as variant `default`.
        let c = Contents::compile(&experiment(5_000, &[])).unwrap();
        let labels: HashSet<_> = (0..200)
            .map(|u| match c.choose("c", &format!("u{u}"), "", "") {
                Choice::Holdout => HOLDOUT.to_owned(),
                Choice::Send { set } => c.label(set).variant.unwrap().to_string(),
            })
            .collect();
        assert_eq!(
            labels,
            HashSet::from([HOLDOUT.to_owned(), DEFAULT_VARIANT.to_owned()])
        );
    }
}
