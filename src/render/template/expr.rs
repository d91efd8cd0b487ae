//! Expressions of the template language: literals, variable paths and ranges. The parser
//! builds them, filters take them as arguments and the evaluator reads them.

#[derive(Debug, Clone)]
pub(crate) enum Expr {
    Str(String),
    Num(f64),
    Bool(bool),
    Nil,
    Empty,
    Blank,
    Path(Path),
    Range(Box<Expr>, Box<Expr>),
}

/// `user.city`, `items[0].name`, `forloop.index`.
#[derive(Debug, Clone)]
pub(crate) struct Path {
    pub root: String,
    pub segs: Vec<Seg>,
    /// The whole path as a dotted key (`user.city`) when every segment is a name: looked up
    /// verbatim first, as recipients' variables are flat.
    pub dotted: Option<String>,
    /// The root is a loop variable (or `forloop`), not a recipient variable.
    pub local: bool,
}

impl Path {
    /// Looked up as one key of the variables, nothing else.
    pub fn is_plain(&self) -> bool {
        !self.local && self.segs.is_empty()
    }

    /// The name as written, for errors.
    pub fn display(&self) -> String {
        let mut s = self.root.clone();
        for seg in &self.segs {
            match seg {
                Seg::Key(k) => {
                    s.push('.');
                    s.push_str(k);
                }
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Seg {
    Key(String),
    Index(i64),
}
