from dmd.daemon import run

run()
