//! Output commit: guest frames held per epoch until the backup acknowledges it.
