"""Fail when a pytest JUnit report shows skipped tests: on CI every test must run."""
import sys
import xml.etree.ElementTree as ElementTree

skipped = []
for case in ElementTree.parse(sys.argv[1]).iter('testcase'):
    for skip in case.findall('skipped'):
        skipped.append('%s::%s: %s' % (case.get('classname'), case.get('name'),
                                      skip.get('message')))
if skipped:
    sys.stderr.write('FAIL: %d tests skipped but must run here:\n  %s\n'
                     % (len(skipped), '\n  '.join(skipped)))
    sys.exit(1)
print('no test was skipped')
