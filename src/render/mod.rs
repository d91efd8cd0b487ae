//! Render stage: a batch's template compiled once, rendered per recipient into a provider request.
//! (Being written; see the helper brief.)
