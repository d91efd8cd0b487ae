//! Tests of the render stage as a whole.
