"""Reading runs back: event files, tables and plots."""
