from editd.cli import console

console()
