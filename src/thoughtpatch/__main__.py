from thoughtpatch.cli import main

main()
