//! Protocol-faithful mock push providers (APNs, FCM) and the load generator's building blocks.
