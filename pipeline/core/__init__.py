"""The ground floor: errors, params sections, atomic files, device and seeding, and the names
of runs, members and files."""
