"""What the tests share: process starters, fixtures, errno helpers, stream parsers.
Production code never imports this."""
