//! The engine's corpus: each filter and tag with its expected output, errors with line and
//! column, the render budget, and property tests that no input panics.

use super::*;
use proptest::prelude::*;

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn render(src: &str, v: &BTreeMap<String, String>) -> Result<String, String> {
    let text = parse(src).map_err(|e| format!("parse: {e}"))?;
    text.render(v)
        .map(Cow::into_owned)
        .map_err(|e| e.to_string())
}

#[track_caller]
fn check(src: &str, v: &[(&str, &str)], expected: &str) {
    assert_eq!(render(src, &vars(v)).as_deref(), Ok(expected), "{src}");
}

#[track_caller]
fn parse_error(src: &str) -> TemplateError {
    match parse(src) {
        Err(e) => e,
        Ok(_) => panic!("{src:?} parsed"),
    }
}

#[test]
fn plain_text_and_single_variables_are_borrowed() {
    let t = parse("Hello there } { }} |").unwrap();
    assert!(t.is_static());
    assert!(matches!(
        t.render(&BTreeMap::new()),
        Ok(Cow::Borrowed("Hello there } { }} |"))
    ));
    assert!(matches!(
        parse("").unwrap().render(&BTreeMap::new()),
        Ok(Cow::Borrowed(""))
    ));
    let v = vars(&[("name", "Ada")]);
    let t = parse("{{ name }}").unwrap();
    assert!(matches!(t.render(&v), Ok(Cow::Borrowed("Ada"))));
}

#[test]
fn variables_spacing_and_defaults() {
    let v = vars(&[
        ("name", "Ada"),
        ("user.first_name", "Grace"),
        ("a-b_c", "x"),
        ("empty", ""),
    ]);
    check("Hi {{name}}!", &[("name", "Ada")], "Hi Ada!");
    assert_eq!(render("Hi {{   name\t}}!", &v).unwrap(), "Hi Ada!");
    assert_eq!(
        render("{{ user.first_name }} & {{a-b_c}}", &v).unwrap(),
        "Grace & x"
    );
    assert_eq!(
        render("Hi {{ missing | default: \"there\" }}", &v).unwrap(),
        "Hi there"
    );
    assert_eq!(
        render("Hi {{ empty|default:'there' }}", &v).unwrap(),
        "Hi there"
    );
    assert_eq!(
        render("Hi {{ name | default: \"there\" }}", &v).unwrap(),
        "Hi Ada"
    );
    assert_eq!(
        render("Hi {{ missing | default: \"}} {{ x\" }}", &v).unwrap(),
        "Hi }} {{ x"
    );
    assert_eq!(render("[{{ empty }}]", &v).unwrap(), "[]");
    assert_eq!(
        parse("Hi {{ first_name }}").unwrap().render(&v),
        Err(RenderError::Missing {
            name: "first_name".into()
        })
    );
    assert_eq!(
        parse("{{ user.city }}").unwrap().render(&v),
        Err(RenderError::Missing {
            name: "user.city".into()
        })
    );
    let t = parse("{{ a }}{{ b | default: 'x' }}{% if c.d %}{% endif %}").unwrap();
    assert_eq!(t.variables().collect::<Vec<_>>(), ["a", "b", "c.d", "c"]);
}

#[test]
fn nested_variables_are_dotted_keys_or_json() {
    let v = [
        ("user.city", "Lisbon"),
        ("user", r#"{"city":"Porto","tags":["a","b"],"age":41}"#),
        (
            "order",
            r#"{"items":[{"name":"Tea","qty":2},{"name":"Cake","qty":1}]}"#,
        ),
    ];
    // The verbatim key wins over the JSON object.
    check("{{ user.city }}", &v, "Lisbon");
    check("{{ user.age | plus: 1 }}", &v, "42");
    check(
        "{{ user.tags[1] }}/{{ user.tags.first }}/{{ user.tags.size }}",
        &v,
        "b/a/2",
    );
    check(
        "{{ order.items[0].name }} {{ order.items[-1].name }}",
        &v,
        "Tea Cake",
    );
    check("{{ user['age'] }}", &v, "41");
}

#[test]
fn string_filters() {
    let v = [("name", "ada LOVELACE"), ("pad", "  hi  ")];
    check("{{ name | upcase }}", &v, "ADA LOVELACE");
    check("{{ name | downcase }}", &v, "ada lovelace");
    check("{{ name | capitalize }}", &v, "Ada lovelace");
    check(
        "[{{ pad | strip }}][{{ pad | lstrip }}][{{ pad | rstrip }}]",
        &v,
        "[hi][hi  ][  hi]",
    );
    check(
        "{{ 'Ground control to Major Tom.' | truncate: 20 }}",
        &[],
        "Ground control to...",
    );
    check(
        "{{ 'Ground control to Major Tom.' | truncate: 25, ', and so on' }}",
        &[],
        "Ground control, and so on",
    );
    check("{{ 'short' | truncate: 20 }}", &[], "short");
    check(
        "{{ 'Ground control to Major Tom.' | truncatewords: 3 }}",
        &[],
        "Ground control to...",
    );
    check(
        "{{ 'Ground control to Major Tom.' | truncatewords: 3, '--' }}",
        &[],
        "Ground control to--",
    );
    check("{{ 'one two' | truncatewords: 3 }}", &[], "one two");
    check(
        "{{ 'Take my protein pills' | replace: 'my', 'your' }}",
        &[],
        "Take your protein pills",
    );
    check("{{ 'a a a' | replace_first: 'a', 'b' }}", &[], "b a a");
    check(
        "{{ name | append: '!' | prepend: '> ' }}",
        &v,
        "> ada LOVELACE!",
    );
    check(
        "{{ 'héllo' | size }} {{ 'héllo' | upcase }}",
        &[],
        "5 HÉLLO",
    );
    check("{{ name | upcase | truncate: 6, '' }}", &v, "ADA LO");
}

#[test]
fn number_filters() {
    let v = [("price", "1234.5"), ("n", "3.14159"), ("count", "7")];
    check(
        "{{ n | round }} {{ n | round: 2 }} {{ '2.5' | round }}",
        &v,
        "3 3.14 3",
    );
    check("{{ price | money }}", &v, "1,234.50");
    check("{{ price | money: 'R$ ', ',', '.' }}", &v, "R$ 1.234,50");
    check("{{ price | money: '$' }}", &v, "$1,234.50");
    check(
        "{{ '-0.005' | money }} {{ '-12' | money: '€' }}",
        &[],
        "-0.01 -€12.00",
    );
    check("{{ '999999.999' | money }}", &[], "1,000,000.00");
    check(
        "{{ count | plus: 3 }} {{ count | minus: 10 }} {{ count | times: 1.5 }}",
        &v,
        "10 -3 10.5",
    );
    check(
        "{{ count | divided_by: 2 }} {{ count | divided_by: 2.5 }}",
        &v,
        "3 2.8",
    );
    assert!(render("{{ count | divided_by: 0 }}", &vars(&v)).is_err());
    let e = parse("{{ x | round }}")
        .unwrap()
        .render(&vars(&[("x", "abc")]))
        .unwrap_err();
    assert_eq!(
        e,
        RenderError::Filter {
            line: 1,
            column: 8,
            message: "round: `abc` is not a number".into()
        }
    );
    assert_eq!(filters::money_for_test(0.0, "", ".", ","), "0.00");
}

#[test]
fn date_filter_with_time_zones() {
    // 2024-03-10T12:30:00Z
    let v = [
        ("ts", "1710073800"),
        ("iso", "2024-03-10T12:30:00Z"),
        ("day", "2024-12-25"),
        ("tz", "Asia/Tokyo"),
    ];
    check("{{ ts | date: '%Y-%m-%d %H:%M' }}", &v, "2024-03-10 12:30");
    check(
        "{{ ts | date: '%H:%M %Z', 'America/Sao_Paulo' }}",
        &v,
        "09:30 -03",
    );
    check(
        "{{ iso | date: '%b %d, %Y %I:%M %p', 'Europe/Paris' }}",
        &v,
        "Mar 10, 2024 01:30 PM",
    );
    check("{{ iso | date: '%H:%M', tz }}", &v, "21:30");
    check("{{ day | date: '%A %d/%m' }}", &v, "Wednesday 25/12");
    let e = parse_error("{{ ts | date: '%Y', 'Mars/Olympus' }}");
    assert_eq!((e.line, e.column), (1, 9));
    assert!(e.message.contains("unknown time zone"), "{e}");
    let e = parse("{{ x | date: '%Y' }}")
        .unwrap()
        .render(&vars(&[("x", "soon")]))
        .unwrap_err();
    assert!(e.to_string().contains("`soon` is not a date"), "{e}");
    assert!(
        render(
            "{{ ts | date: '%Y', zone }}",
            &vars(&[("ts", "0"), ("zone", "Nowhere/Else")])
        )
        .is_err()
    );
}

#[test]
fn if_elsif_else_unless_and_comparisons() {
    let t = "{% if tier == 'gold' %}G{% elsif tier == 'silver' %}S{% else %}-{% endif %}";
    check(t, &[("tier", "gold")], "G");
    check(t, &[("tier", "silver")], "S");
    check(t, &[("tier", "bronze")], "-");
    check(t, &[], "-");
    check(
        "{% unless vip %}not vip{% endunless %}",
        &[("vip", "false")],
        "not vip",
    );
    check(
        "{% unless vip %}not vip{% else %}vip{% endunless %}",
        &[("vip", "true")],
        "vip",
    );
    // Numbers where they parse: "9" < "10" numerically, "10" == 10.0.
    check("{% if n < 10 %}small{% endif %}", &[("n", "9")], "small");
    check(
        "{% if a < b %}lt{% else %}ge{% endif %}",
        &[("a", "9"), ("b", "10")],
        "lt",
    );
    check("{% if n == 10.0 %}ten{% endif %}", &[("n", "10")], "ten");
    check(
        "{% if n >= 10 and n <= 20 %}in{% endif %}",
        &[("n", "15")],
        "in",
    );
    check(
        "{% if n > 10 or m %}yes{% endif %}",
        &[("n", "1"), ("m", "x")],
        "yes",
    );
    check(
        "{% if n != 3 %}ne{% endif %}{% if n <> 3 %}ne{% endif %}",
        &[("n", "4")],
        "nene",
    );
    check(
        "{% if name contains 'da' %}c{% endif %}",
        &[("name", "Ada")],
        "c",
    );
    check(
        "{% if tags contains 'b' %}c{% endif %}",
        &[("tags", r#"["a","b"]"#)],
        "c",
    );
    // Right to left, as Liquid: true or (false and false).
    check(
        "{% if true or false and false %}t{% else %}f{% endif %}",
        &[],
        "t",
    );
    // Empty and `false` strings are false; missing is false.
    check("{% if e %}t{% else %}f{% endif %}", &[("e", "")], "f");
    check(
        "{% if name %}Hi {{ name }}{% else %}Hi there{% endif %}",
        &[],
        "Hi there",
    );
    check(
        "{% if name == empty %}E{% endif %}{% if name == blank %}B{% endif %}",
        &[("name", " ")],
        "B",
    );
    check(
        "{% if city == 'São Paulo' %}SP{% endif %}",
        &[("city", "São Paulo")],
        "SP",
    );
}

#[test]
fn case_when() {
    let t = "{% case lang %}{% when 'pt', 'pt-BR' %}Olá{% when 'es' or 'es-MX' %}Hola{% else %}Hi{% endcase %}";
    check(t, &[("lang", "pt-BR")], "Olá");
    check(t, &[("lang", "es-MX")], "Hola");
    check(t, &[("lang", "de")], "Hi");
    check(
        "{% case n %}{% when 1 %}one{% when 2 %}two{% endcase %}",
        &[("n", "2")],
        "two",
    );
}

#[test]
fn for_loops() {
    let items =
        r#"[{"name":"Tea","price":3},{"name":"Cake","price":4.5},{"name":"Jam","price":2}]"#;
    let v = [("items", items), ("nums", "[1,2,3,4,5]"), ("none", "[]")];
    check(
        "{% for i in items %}{{ i.name }}{% unless forloop.last %}, {% endunless %}{% endfor %}",
        &v,
        "Tea, Cake, Jam",
    );
    check(
        "{% for i in items limit: 2 %}{{ forloop.index }}:{{ i.name }} {% endfor %}",
        &v,
        "1:Tea 2:Cake ",
    );
    check(
        "{% for n in nums offset: 1 limit: 3 reversed %}{{ n }}{% endfor %}",
        &v,
        "432",
    );
    check(
        "{% for n in none %}x{% else %}empty{% endfor %}",
        &v,
        "empty",
    );
    check(
        "{% for n in missing %}x{% else %}empty{% endfor %}",
        &v,
        "empty",
    );
    check("{% for n in (1..4) %}{{ n }}{% endfor %}", &[], "1234");
    check(
        "{% for n in nums %}{% if n == 3 %}{% break %}{% endif %}{{ n }}{% endfor %}",
        &v,
        "12",
    );
    check(
        "{% for n in nums %}{% if n == 3 %}{% continue %}{% endif %}{{ n }}{% endfor %}",
        &v,
        "1245",
    );
    check(
        "{% for i in items %}{{ i.price | money: '$' }} {% endfor %}",
        &v,
        "$3.00 $4.50 $2.00 ",
    );
    check(
        "{{ nums | join: '-' }} {{ nums | first }} {{ nums | last }} {{ nums | size }}",
        &v,
        "1-2-3-4-5 1 5 5",
    );
    // A loop variable is not a recipient variable.
    let t = parse("{% for i in items %}{{ i.name }}{% endfor %}").unwrap();
    assert_eq!(t.variables().collect::<Vec<_>>(), ["items"]);
    let e = parse("{% for i in s %}{% endfor %}")
        .unwrap()
        .render(&vars(&[("s", "abc")]))
        .unwrap_err();
    assert!(e.to_string().contains("not a list"), "{e}");
}

#[test]
fn whitespace_control_raw_and_comments() {
    check("a  {{- 'b' -}}  c", &[], "abc");
    check("x\n  {%- if true -%}\n  y\n  {%- endif -%}\n z", &[], "xyz");
    check(
        "{% raw %}{{ not a tag }}{% endraw %}!",
        &[],
        "{{ not a tag }}!",
    );
    check(
        "a{% comment %} {{ x }} {% if %} {% endcomment %}b",
        &[],
        "ab",
    );
}

#[test]
fn errors_carry_line_and_column() {
    let e = parse_error("Hi {{ x");
    assert_eq!((e.line, e.column), (1, 4));
    assert_eq!(
        e.to_string(),
        "line 1, column 4: unterminated tag: `{{` without a closing `}}`"
    );
    let e = parse_error("Hello\nthere {{ name | shout }}");
    assert_eq!((e.line, e.column), (2, 17));
    assert_eq!(e.message, "unknown filter `shout`");
    let e = parse_error("a\nb\n{% if x %}never closed");
    assert_eq!((e.line, e.column), (3, 1));
    assert!(e.message.contains("`if` is never closed"), "{e}");
    let e = parse_error("{% endif %}");
    assert!(e.message.contains("unexpected `endif`"), "{e}");
    let e = parse_error("é {% frobnicate %}");
    assert_eq!((e.line, e.column), (1, 3));
    assert!(e.message.starts_with("unknown tag `frobnicate`"), "{e}");
    assert_eq!(parse_error("a {{}}").column, 3);
    assert!(parse_error("{{ a b }}").message.contains("unexpected `b`"));
    assert!(
        parse_error("{{ a | truncate: 1, 2, 3 }}")
            .message
            .contains("0 to 2 arguments")
    );
    assert!(
        parse_error("{{ a | default: \"x }}")
            .message
            .contains("unterminated")
    );
    assert!(
        parse_error("{% if %}{% endif %}")
            .message
            .contains("expected a condition")
    );
    assert!(
        parse_error("{% break %}")
            .message
            .contains("outside a `for`")
    );
    assert!(parse_error("{% raw %}x").message.contains("endraw"));
    assert!(
        parse_error("{{ x | date: '%' }}")
            .message
            .contains("bad format")
    );
}

#[test]
fn render_budget_bounds_output_and_iterations() {
    let big = "x".repeat(4000);
    let v = vars(&[
        ("big", &big),
        ("list", &format!("[{}]", vec!["1"; 600].join(","))),
    ]);
    // Geometric growth through replace is refused before it is built.
    let t = parse("{{ big | replace: 'x', 'xxxxxxxxxx' | replace: 'x', 'xxxxxxxxxx' }}").unwrap();
    assert!(matches!(t.render(&v), Err(RenderError::Budget { .. })));
    // Output over the cap.
    let t = parse("{% for i in list %}{{ big }}{% endfor %}").unwrap();
    assert!(matches!(t.render(&v), Err(RenderError::Budget { .. })));
    // Nested loops over the iteration cap (600 x 600).
    let t = parse("{% for i in list %}{% for j in list %}{% endfor %}{% endfor %}").unwrap();
    let e = t.render(&v).unwrap_err();
    assert!(e.to_string().contains("loop iterations"), "{e}");
    let t = parse("{% for i in (1..100000000) %}{% endfor %}").unwrap();
    assert!(matches!(t.render(&v), Err(RenderError::Budget { .. })));
    // Deep nesting is a parse error, not a stack overflow.
    let deep = "{% if a %}".repeat(200) + &"{% endif %}".repeat(200);
    assert!(parse_error(&deep).message.contains("nested"));
    let chain = format!("{{{{ a {} }}}}", "| upcase ".repeat(100));
    assert!(parse_error(&chain).message.contains("filters"));
    let cond = format!("{{% if {} a %}}{{% endif %}}", "a or ".repeat(100));
    assert!(parse_error(&cond).message.contains("and`/`or"));
    // The buffer is left as it was on error.
    let mut out = String::from("keep");
    assert!(
        parse("a {{ x }} b")
            .unwrap()
            .render_into(&BTreeMap::new(), &mut out)
            .is_err()
    );
    assert_eq!(out, "keep");
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("abc", 0), (1, 1));
    assert_eq!(line_col("a\nbc", 3), (2, 2));
    assert_eq!(line_col("éé", 4), (1, 3));
    assert_eq!(line_col("é", 1), (1, 1));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn text_without_tags_renders_unchanged(s in "\\PC*") {
        prop_assume!(!s.contains("{{") && !s.contains("{%"));
        let t = parse(&s).unwrap();
        prop_assert!(t.is_static());
        let vars = BTreeMap::new();
        let r = t.render(&vars).unwrap();
        prop_assert!(matches!(r, Cow::Borrowed(_)));
        prop_assert_eq!(r.as_ref(), s.as_str());
    }

    #[test]
    fn random_templates_never_panic(
        s in "(\\PC|\\{\\{|\\}\\}|\\{%|%\\}|-|\\||:|,|'|\"| if | endif | for | in | endfor | else | case | when | endcase |\\.\\.|\\(|\\)|\\[|\\]| a | b | and | or | == | < | upcase| default| date| truncate| replace| money| round)*",
        a in "\\PC{0,8}",
        b in "(\\[1,2\\]|\\{\"c\":3\\}|[0-9.]{0,4}|\\PC{0,4})",
    ) {
        if let Ok(t) = parse(&s) {
            let v = vars(&[("a", &a), ("b", &b)]);
            if let Ok(out) = t.render(&v) {
                prop_assert!(out.len() <= MAX_OUTPUT_BYTES);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..96)) {
        let s = String::from_utf8_lossy(&b);
        if let Ok(t) = parse(&s) {
            let _ = t.render(&BTreeMap::new());
        }
    }

    #[test]
    fn errors_point_inside_the_text(s in "[a-z \n]{0,10}(\\{\\{|\\{%)[a-z |:'\n]{0,10}") {
        if let Err(e) = parse(&s) {
            let lines = s.split('\n').count() as u32;
            prop_assert!(e.line >= 1 && e.line <= lines, "{e} in {s:?}");
            prop_assert!(e.column >= 1);
        }
    }
}
