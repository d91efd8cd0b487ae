//! The mocks' own tests, one binary: each mock driven over real HTTP/2 by a raw client, checking
//! that it accepts what Apple and Google accept and refuses the rest as they do.

mod client;

mod apns;
mod fcm;
