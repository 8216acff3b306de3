from sftpvault.cli import main

main()
