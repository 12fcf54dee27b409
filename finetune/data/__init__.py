"""The dataset stage: find, check, de-duplicate, split, augment and draw (synthetic) datasets."""
