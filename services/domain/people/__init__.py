"""People: enrollment lookup (phone numbers, selectors) and personal tokens."""
